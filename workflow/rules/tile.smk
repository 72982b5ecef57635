rule tile:
    input:
        slide=slide_path,
        mask=rules.tissue.output.mask,
    output:
        tiles=directory(f"{R}/tiles/{{slide}}.zarr"),
    params:
        mpp=slide_mpp,
        settings=settings("reader", "mpp_override", "tissue", "scales_mpp", "tile_px", "tiling"),
    log:
        f"{R}/logs/tile/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/tile/{{slide}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi tile {input.slide:q} --tissue {input.mask:q} --slide-id {wildcards.slide} "
        "--out {output.tiles:q} {params.mpp} {params.settings} 2> {log:q}"
