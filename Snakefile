# histoalign-wsi: zero-shot whole-slide histopathology with vision-language models.
# Reads config.yaml, validates it (with the cohort, encoders, prompt bag and labels) before
# any job runs, includes one rule file per stage, declares `rule all`.

import sys

from snakemake.utils import min_version

from histoalign_wsi.workflow import check_config_file

min_version("8.0")

# YAML aliases or absurd nesting in config.yaml: one line naming the file, before
# Snakemake's own reader expands it (or overflows its stack)
if (problem := check_config_file("config.yaml")) is not None:
    sys.exit(problem)


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/outputs.smk"
include: "workflow/rules/learn.smk"
include: "workflow/rules/reports.smk"


wildcard_constraints:
    slide=SLIDE_ID_PATTERN,
    batch="b[0-9]+",
    head="linear|abmil|abmil_noscale",


rule all:
    input:
        WF.final_outputs(),
    default_target: True


onstart:
    # one run per results folder, from any checkout (refused naming the other run)
    # --forceall / --forcerun RULE: the batch jobs of those stages redo every slide
    try:
        start_run(R, recompute=forced_stages_of(workflow.dag_settings))
    except ConfigError as exc:
        sys.exit(f"histoalign-wsi: {exc}")


onsuccess:
    # failed_slides.tsv lists the slides a batch recorded as failed (the others went on);
    # the run then exits non-zero, and the next run tries those slides again
    failed = finish_run(R, WF.slides, ok=True, per_job=WF.config.slides_per_job, workflow=WF)
    if failed:
        sys.exit(
            f"histoalign-wsi: {len(failed)} of {len(WF.slides)} slides failed "
            f"(see {R}/failed_slides.tsv); rerun to try them again"
        )


onerror:
    # with --keep-going: the cohort table of the slides whose predictions are current (made
    # from this run's inputs), and failed_slides.tsv naming the others with their error
    finish_run(R, WF.slides, ok=False, per_job=WF.config.slides_per_job, workflow=WF)
