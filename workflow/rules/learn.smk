# Heads trained on the stored features (`snakemake fit`, `snakemake predict`); driven by
# config `heads` and a label sheet. The default run stays zero-shot.


rule fit:
    input:
        features=WF.manifests("encode"),
    output:
        models=directory(f"{R}/models"),
        attention=directory(f"{R}/attention"),
    params:
        labels=WF.fit_labels_flag(),
        settings=WF.settings("fit"),
        made_from=[WF.file_key(WF.labels_sheet), STAGE_VERSIONS["fit"]],
    log:
        f"{R}/logs/fit.log",
    benchmark:
        f"{R}/benchmarks/fit.tsv"
    threads: 2
    resources:
        **WF.cluster("fit"),
        mem_mb=8000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi fit --threads {threads} {input.features:q} {params.labels} --out {output.models:q} "
        "--attention {output.attention:q} {params.settings} 2>&1 | tee {log:q} >&2"


rule predict_head:
    input:
        features=WF.manifests("encode"),
        models=rules.fit.output.models,
    output:
        csv=f"{R}/heads/{{head}}/predictions.csv",
    params:
        out=lambda w, output: os.path.dirname(output.csv),
        settings=WF.settings("predict"),
    log:
        f"{R}/logs/predict_{{head}}.log",
    benchmark:
        f"{R}/benchmarks/predict_{{head}}.tsv"
    threads: 1
    resources:
        **WF.cluster("predict_head"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi predict --threads {threads} {input.features:q} --head {input.models:q}/{wildcards.head} "
        "--out {params.out:q} {params.settings} 2>&1 | tee {log:q} >&2"


rule predict:
    input:
        expand(f"{R}/heads/{{head}}/predictions.csv", head=WF.head_names),


rule site_signature:
    # how well each encoder's features tell the site: made when the cohort has a site key
    input:
        features=WF.manifests("encode"),
    output:
        json=f"{R}/site_signature.json",
    params:
        labels=WF.fit_labels_flag(),
        settings=WF.settings("site_signature"),
        made_from=WF.summarize_key,
    log:
        f"{R}/logs/site_signature.log",
    benchmark:
        f"{R}/benchmarks/site_signature.tsv"
    threads: 2
    resources:
        **WF.cluster("site_signature"),
        mem_mb=4000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi site-signature --threads {threads} {input.features:q} {params.labels} "
        "--out {output.json:q} {params.settings} 2>&1 | tee {log:q} >&2"
