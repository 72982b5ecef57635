rule heatmap:
    input:
        unpack(lambda w: WF.attention_input(w.slide)),
        slide=lambda w: WF.slide_path(w.slide),
        tiles=rules.score.output.tiles,
        prediction=rules.score.output.prediction,
    output:
        heatmaps=directory(f"{R}/heatmaps/{{slide}}"),
    params:
        attention=lambda w, input: WF.attention_flag(input, w.slide),
        settings=WF.settings("heatmap"),
    log:
        f"{R}/logs/heatmap/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/heatmap/{{slide}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi heatmap --threads {threads} {input.tiles:q} --prediction {input.prediction:q} --slide {input.slide:q} "
        "--out {output.heatmaps:q} {params.attention} {params.settings} 2>&1 | tee {log:q} >&2"


rule export_geojson:
    input:
        unpack(lambda w: WF.attention_input(w.slide)),
        tiles=rules.score.output.tiles,
        prediction=rules.score.output.prediction,
        tissue=rules.tissue.output.meta,
        tile_store=rules.tile.output.tiles,
    output:
        geojson=f"{R}/geojson/{{slide}}.geojson",
    params:
        attention=lambda w, input: WF.attention_flag(input, w.slide),
        settings=WF.settings("export_geojson"),
    log:
        f"{R}/logs/export_geojson/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/export_geojson/{{slide}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi export-geojson --threads {threads} {input.tiles:q} --prediction {input.prediction:q} "
        "--store {input.tile_store:q} --tissue {input.tissue:q} --out {output.geojson:q} "
        "{params.attention} {params.settings} 2>&1 | tee {log:q} >&2"


rule report:
    input:
        csv=rules.summarize.output.csv,
        metrics=rules.summarize.output.metrics,
        heatmaps=expand(f"{R}/heatmaps/{{slide}}", slide=WF.slides),
        **WF.learned_from_reports(),
    output:
        html=f"{R}/report.html",
    params:
        results=folder_of("csv"),
        settings=WF.settings("report"),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../../envs/histoalign.yaml"
    shell:
        "histoalign-wsi report --threads {threads} {input.csv:q} --results {params.results:q} --out {output.html:q} "
        "{params.settings} 2>&1 | tee {log:q} >&2"
