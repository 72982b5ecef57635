rule tissue:
    input:
        slide=lambda w: WF.slide_path(w.slide),
    output:
        mask=f"{R}/tissue/{{slide}}.png",
        meta=f"{R}/tissue/{{slide}}.json",
    params:
        mpp=lambda w: WF.mpp_flag(w.slide),
        settings=WF.settings("tissue"),
    log:
        f"{R}/logs/tissue/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/tissue/{{slide}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi tissue --threads {threads} {input.slide:q} --out {output.mask:q} {params.mpp} {params.settings} 2>&1 | tee {log:q} >&2"
