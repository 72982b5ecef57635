# Tissue and tiles, per batch of `slides_per_job` slides (one process): writes
# tissue/{slide}.png+json and tiles/{slide}.zarr, and the batch manifest.


rule prepare:
    input:
        slides=lambda w: WF.batch_paths(w.batch),
    output:
        manifest=f"{R}/batches/prepare/{{batch}}.tsv",
    params:
        spec=lambda w: WF.spec(w.batch),
        retry=lambda w: WF.retry("prepare", w.batch),
        results=results_of("manifest", 3),
        settings=WF.settings("prepare"),
        made_from=lambda w: WF.prepare_key(w.batch),
    log:
        f"{R}/logs/prepare/{{batch}}.log",
    benchmark:
        f"{R}/benchmarks/prepare/{{batch}}.tsv"
    threads: 1
    resources:
        **WF.cluster("prepare"),
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi batch prepare --threads {threads} --spec {params.spec:q} --results {params.results:q} "
        "--out {output.manifest:q} --token={params.retry:q} {params.settings} 2>&1 | tee {log:q} >&2"
