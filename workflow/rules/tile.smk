rule tile:
    input:
        slide=lambda w: WF.slide_path(w.slide),
        mask=rules.tissue.output.mask,
    output:
        tiles=directory(f"{R}/tiles/{{slide}}.zarr"),
    params:
        mpp=lambda w: WF.mpp_flag(w.slide),
        settings=WF.settings("tile"),
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
        "histoalign-wsi tile --threads {threads} {input.slide:q} --tissue {input.mask:q} --slide-id {wildcards.slide:q} "
        "--out {output.tiles:q} {params.mpp} {params.settings} 2>&1 | tee {log:q} >&2"
