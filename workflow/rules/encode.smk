# Features, per batch of slides: the encoders load once per job (features/{slide}.zarr).


rule encode:
    input:
        upstream=rules.prepare.output.manifest,
    output:
        manifest=f"{R}/batches/encode/{{batch}}.tsv",
    params:
        spec=lambda w: WF.spec(w.batch),
        retry=lambda w: WF.retry("encode", w.batch),
        results=results_of("manifest", 3),
        settings=WF.settings("encode"),
        made_from=WF.encode_key,
    log:
        f"{R}/logs/encode/{{batch}}.log",
    benchmark:
        f"{R}/benchmarks/encode/{{batch}}.tsv"
    # every CPU a job is granted: the SLURM profile's cpus_per_task follow threads, and a
    # local run caps them at --cores; the encode stage splits them between slide readers
    # and torch (on a GPU, nearly all go to readers)
    threads: 8
    resources:
        **WF.cluster("encode"),
        mem_mb=8000,
        gpu=WF.config.cluster.encode_gpus,
        run_settings=WF.run_settings("encode"),
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi batch encode --threads {threads} --spec {params.spec:q} --results {params.results:q} "
        "--upstream {input.upstream:q} --out {output.manifest:q} --token={params.retry:q} {params.settings} {resources.run_settings} "
        "2>&1 | tee {log:q} >&2"
