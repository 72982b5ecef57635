rule embed_prompts:
    input:
        bag=prompt_bag_file(),
    output:
        text=f"{R}/text_embeddings.npz",
    params:
        cache=f"{R}/cache/text",
        settings=settings("encoders", "encoder_registry", "offline", "device", "prompt_bag", "pooling"),
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
        "histoalign-wsi embed-prompts --out {output.text:q} --cache {params.cache:q} "
        "{params.settings} 2> {log:q}"


rule calibrate:
    input:
        features=expand(f"{R}/features/{{slide}}.zarr", slide=SLIDES),
        text=rules.embed_prompts.output.text,
    output:
        calibration=f"{R}/calibration.json",
    params:
        settings=settings("scales_mpp", "alignment", "encoder_weights"),
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
        "histoalign-wsi calibrate {input.features:q} --text {input.text:q} --out {output.calibration:q} "
        "{params.settings} 2> {log:q}"


rule score:
    input:
        unpack(score_inputs),
    output:
        prediction=f"{R}/predictions/{{slide}}.json",
        tiles=f"{R}/tile_scores/{{slide}}.parquet",
    params:
        calibration=lambda wildcards, input: f"--calibration {input.calibration}" if "calibration" in input.keys() else "",
        settings=settings("scales_mpp", "alignment", "pooling", "encoder_weights"),
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
        "histoalign-wsi score {input.features:q} --text {input.text:q} --prediction {output.prediction:q} "
        "--tile-scores {output.tiles:q} {params.calibration} {params.settings} 2> {log:q}"


rule summarize:
    input:
        predictions=expand(f"{R}/predictions/{{slide}}.json", slide=SLIDES),
    output:
        csv=f"{R}/predictions.csv",
        metrics=f"{R}/metrics.json" if labels_sheet() else [],
        confusion=f"{R}/confusion_matrix.png" if labels_sheet() else [],
    params:
        labels=f"--labels {shlex.quote(labels_sheet())} --metrics {R}/metrics.json --confusion {R}/confusion_matrix.png" if labels_sheet() else "",
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
        "histoalign-wsi summarize {input.predictions:q} --out {output.csv:q} {params.labels} 2> {log:q}"
