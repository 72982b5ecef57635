# The cohort's outputs (report.html), and one slide's outputs as a target of its own:
# `snakemake results/slides/SLIDE.tsv` runs the batch that holds that slide and fails,
# naming the error, when that slide failed.


rule slide:
    input:
        manifest=lambda w: WF.manifest("finish", WF.batch_of(w.slide)),
    output:
        status=f"{R}/slides/{{slide}}.tsv",
    params:
        spec=lambda w: WF.spec_of(w.slide),
        results=results_of("status", 2),
    log:
        f"{R}/logs/slide/{{slide}}.log",
    threads: 1
    resources:
        **WF.cluster("slide"),
        mem_mb=500,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi batch pick --spec {params.spec:q} --results {params.results:q} --upstream {input.manifest:q} "
        "--out {output.status:q} 2>&1 | tee {log:q} >&2"


rule run_record:
    # run.json: package versions, encoders and weights, every prompt, every scoring
    # setting, the slides' fingerprints, the heads' splits: what reproduces every figure
    input:
        csv=rules.summarize.output.csv,
        metrics=rules.summarize.output.metrics,
        **WF.learned_from_reports(),
    output:
        json=f"{R}/run.json",
    params:
        results=folder_of("csv"),
        settings=WF.settings("run_record"),
        made_from=[WF.encode_key, WF.text_key, WF.finish_key, WF.summarize_key],
    log:
        f"{R}/logs/run_record.log",
    threads: 1
    resources:
        **WF.cluster("run_record"),
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi run-record --threads {threads} --results {params.results:q} --out {output.json:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"


rule report:
    input:
        csv=rules.summarize.output.csv,
        metrics=rules.summarize.output.metrics,
        run=rules.run_record.output.json,
        batches=WF.manifests("finish"),
        **WF.learned_from_reports(),
    output:
        html=f"{R}/report.html",
    params:
        results=folder_of("csv"),
        settings=WF.settings("report"),
        show=WF.report_show(),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    threads: 1
    resources:
        **WF.cluster("report"),
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi report --threads {threads} {input.csv:q} --results {params.results:q} --out {output.html:q} "
        "{params.show} {params.settings} 2>&1 | tee {log:q} >&2"
