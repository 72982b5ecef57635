rule embed_prompts:
    input:
        bag=bag_file(WF.config.prompt_bag),
    output:
        text=f"{R}/text_embeddings.npz",
    params:
        cache=f"{R}/cache/text",
        settings=WF.settings("embed_prompts"),
        made_from=WF.text_key,
    log:
        f"{R}/logs/embed_prompts.log",
    benchmark:
        f"{R}/benchmarks/embed_prompts.tsv"
    threads: 1
    resources:
        **WF.cluster("embed_prompts"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi embed-prompts --threads {threads} --out {output.text:q} --cache {params.cache:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"


rule calibrate:
    input:
        features=WF.manifests("encode"),
        text=rules.embed_prompts.output.text,
    output:
        calibration=f"{R}/calibration.json",
    params:
        settings=WF.settings("calibrate"),
        made_from=STAGE_VERSIONS["calibrate"],
    log:
        f"{R}/logs/calibrate.log",
    benchmark:
        f"{R}/benchmarks/calibrate.tsv"
    threads: 2
    resources:
        **WF.cluster("calibrate"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi calibrate --threads {threads} {input.features:q} --text {input.text:q} --out {output.calibration:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"


rule finish:
    # score, heatmaps and QuPath GeoJSON per batch of slides (predictions/, tile_scores/,
    # heatmaps/, geojson/ per slide)
    input:
        unpack(lambda w: WF.finish_inputs(w.batch)),
    output:
        manifest=f"{R}/batches/finish/{{batch}}.tsv",
    params:
        spec=lambda w: WF.spec(w.batch),
        retry=lambda w: WF.retry("finish", w.batch),
        results=results_of("manifest", 3),
        flags=lambda w, input: WF.finish_flags(input),
        settings=WF.settings("finish"),
        made_from=WF.finish_key,
    log:
        f"{R}/logs/finish/{{batch}}.log",
    benchmark:
        f"{R}/benchmarks/finish/{{batch}}.tsv"
    threads: 1
    resources:
        **WF.cluster("finish"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi batch finish --threads {threads} --spec {params.spec:q} --results {params.results:q} "
        "--upstream {input.upstream:q} --text {input.text:q} --out {output.manifest:q} --token={params.retry:q} "
        "{params.flags} {params.settings} 2>&1 | tee {log:q} >&2"


rule summarize:
    input:
        predictions=WF.manifests("finish"),
    output:
        csv=f"{R}/predictions.csv",
        metrics=f"{R}/metrics.json" if WF.labels_sheet else [],
        confusion=f"{R}/confusion_matrix.png" if WF.labels_sheet else [],
    params:
        labels=WF.labels_flags(),
        settings=WF.settings("summarize"),
        made_from=WF.summarize_key,
    log:
        f"{R}/logs/summarize.log",
    benchmark:
        f"{R}/benchmarks/summarize.tsv"
    threads: 1
    resources:
        **WF.cluster("summarize"),
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi summarize --threads {threads} {input.predictions:q} --out {output.csv:q} {params.labels} {params.settings} 2>&1 | tee {log:q} >&2"


rule screen_prompts:
    # protocol keep: KEEP's label-free prompt-set screening over the run's slides
    input:
        features=WF.manifests("encode"),
        text=rules.embed_prompts.output.text,
    output:
        screening=f"{R}/prompt_screening.json",
    params:
        settings=WF.settings("screen_prompts"),
        made_from=STAGE_VERSIONS["screen_prompts"],
    log:
        f"{R}/logs/screen_prompts.log",
    benchmark:
        f"{R}/benchmarks/screen_prompts.tsv"
    threads: 2
    resources:
        **WF.cluster("screen_prompts"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi screen-prompts --threads {threads} {input.features:q} --text {input.text:q} "
        "--out {output.screening:q} {params.settings} 2>&1 | tee {log:q} >&2"
