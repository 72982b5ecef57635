# Learning from pathology reports, on the stored features (optional targets; the default
# run stays zero-shot): `snakemake train_reports` needs config `reports`,
# `snakemake distill` needs `report_corpus` and labels. When configured, `all` and the
# report page include them.


rule train_reports:
    input:
        features=WF.manifests("encode"),
        sheet=WF.reports_input,
    output:
        metrics=f"{R}/reports/metrics.json",
    params:
        out=lambda w, output: os.path.dirname(output.metrics),
        reports=WF.reports_flag(),
        labels=WF.fit_labels_flag(),
        settings=WF.settings("train_reports"),
        made_from=lambda w: [WF.file_key(WF.config.reports), WF.file_key(WF.labels_sheet)],
    log:
        f"{R}/logs/train_reports.log",
    benchmark:
        f"{R}/benchmarks/train_reports.tsv"
    threads: 2
    resources:
        **WF.cluster("train_reports"),
        mem_mb=8000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi train-reports --threads {threads} {input.features:q} {params.reports} {params.labels} "
        "--out {params.out:q} {params.settings} 2>&1 | tee {log:q} >&2"


rule pair_reports:
    input:
        features=WF.manifests("encode"),
        corpus=WF.corpus_input,
    output:
        pairs=f"{R}/pairs/pairs.csv",
        npz=f"{R}/pairs/items.npz",
    params:
        out=lambda w, output: os.path.dirname(output.pairs),
        corpus=WF.corpus_flag(),
        settings=WF.settings("pair_reports"),
        made_from=lambda w: WF.file_key(WF.config.report_corpus),
    log:
        f"{R}/logs/pair_reports.log",
    benchmark:
        f"{R}/benchmarks/pair_reports.tsv"
    threads: 2
    resources:
        **WF.cluster("pair_reports"),
        mem_mb=8000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi pair-reports --threads {threads} {input.features:q} {params.corpus} --out {params.out:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"


rule distill:
    input:
        npz=rules.pair_reports.output.npz,
        labels=WF.distill_labels_input,
    output:
        metrics=f"{R}/distill/metrics.json",
    params:
        pairs=lambda w, input: os.path.dirname(input.npz),
        out=lambda w, output: os.path.dirname(output.metrics),
        labels=WF.fit_labels_flag(),
        settings=WF.settings("distill"),
        made_from=WF.file_key(WF.labels_sheet),
    log:
        f"{R}/logs/distill.log",
    benchmark:
        f"{R}/benchmarks/distill.tsv"
    threads: 1
    resources:
        **WF.cluster("distill"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi distill --threads {threads} {params.pairs:q} {params.labels} --out {params.out:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"
