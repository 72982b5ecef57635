rule encode:
    input:
        slide=lambda w: WF.slide_path(w.slide),
        tiles=rules.tile.output.tiles,
    output:
        features=directory(f"{R}/features/{{slide}}.zarr"),
    params:
        settings=WF.settings("encode"),
    log:
        f"{R}/logs/encode/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/encode/{{slide}}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        gpu=1,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi encode --threads {threads} {input.tiles:q} --slide {input.slide:q} --out {output.features:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"
