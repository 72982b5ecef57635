# Shared by the stage files. The cohort (checked before anything runs), outputs, and the
# per-stage settings handed to the CLI.

import json
import os
import shlex

from histoalign_wsi.cli_support import bag_file, check_workflow_config, write_partial_summary
from histoalign_wsi.cohort import SLIDE_ID_PATTERN

COHORT = check_workflow_config(config)  # slide_id -> SlideEntry; raises naming the bad value
R = config["results"]
SLIDES = sorted(COHORT)


def slide_path(wildcards):
    return str(COHORT[wildcards.slide].path)


def slide_mpp(wildcards):
    mpp = COHORT[wildcards.slide].mpp
    return f"--mpp {mpp}" if mpp else ""


def settings(*keys):
    """--set options carrying only the config keys a stage uses, so that a change of,
    say, the prompt bag reruns only the stages that read it."""
    return " ".join(
        shlex.quote(f"--set={k}={json.dumps(config[k], sort_keys=True)}") for k in keys
    )


def labels_sheet():
    if config.get("labels"):
        return config["labels"]
    if any(e.label for e in COHORT.values()):
        return config["slides"]
    return None


def all_outputs():
    out = [f"{R}/predictions.csv", f"{R}/report.html"]
    out += expand(f"{R}/heatmaps/{{slide}}", slide=SLIDES)
    out += expand(f"{R}/geojson/{{slide}}.geojson", slide=SLIDES)
    if labels_sheet():
        out.append(f"{R}/metrics.json")
    return out


def prompt_bag_file():
    return bag_file(config["prompt_bag"])


def score_inputs(wildcards):
    d = {"features": f"{R}/features/{wildcards.slide}.zarr", "text": f"{R}/text_embeddings.npz"}
    if config["calibration"]:
        d["calibration"] = f"{R}/calibration.json"
    return d
