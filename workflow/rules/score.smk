rule embed_prompts:
    input:
        bag=bag_file(WF.config.prompt_bag),
    output:
        text=f"{R}/text_embeddings.npz",
    params:
        cache=f"{R}/cache/text",
        settings=WF.settings("embed_prompts"),
    log:
        f"{R}/logs/embed_prompts.log",
    benchmark:
        f"{R}/benchmarks/embed_prompts.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi embed-prompts --threads {threads} --out {output.text:q} --cache {params.cache:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"


rule calibrate:
    input:
        features=expand(f"{R}/features/{{slide}}.zarr", slide=WF.slides),
        text=rules.embed_prompts.output.text,
    output:
        calibration=f"{R}/calibration.json",
    params:
        settings=WF.settings("calibrate"),
    log:
        f"{R}/logs/calibrate.log",
    benchmark:
        f"{R}/benchmarks/calibrate.tsv"
    threads: 2
    resources:
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi calibrate --threads {threads} {input.features:q} --text {input.text:q} --out {output.calibration:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"


rule score:
    input:
        unpack(lambda w: WF.score_inputs(w.slide)),
    output:
        prediction=f"{R}/predictions/{{slide}}.json",
        tiles=f"{R}/tile_scores/{{slide}}.parquet",
    params:
        calibration=lambda w, input: WF.calibration_flag(input),
        settings=WF.settings("score"),
    log:
        f"{R}/logs/score/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/score/{{slide}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi score --threads {threads} {input.features:q} --text {input.text:q} --prediction {output.prediction:q} "
        "--tile-scores {output.tiles:q} {params.calibration} {params.settings} 2>&1 | tee {log:q} >&2"


rule summarize:
    input:
        predictions=expand(f"{R}/predictions/{{slide}}.json", slide=WF.slides),
    output:
        csv=f"{R}/predictions.csv",
        metrics=f"{R}/metrics.json" if WF.labels_sheet else [],
        confusion=f"{R}/confusion_matrix.png" if WF.labels_sheet else [],
    params:
        labels=WF.labels_flags(),
    log:
        f"{R}/logs/summarize.log",
    benchmark:
        f"{R}/benchmarks/summarize.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi summarize --threads {threads} {input.predictions:q} --out {output.csv:q} {params.labels} 2>&1 | tee {log:q} >&2"
