# Shared by the stage files: the validated configuration and cohort (checked before
# anything runs; see histoalign_wsi/workflow.py), and the names the rules use.

import atexit
import os
import sys

from histoalign_wsi.errors import ConfigError
from histoalign_wsi.slides.cohort import SLIDE_ID_PATTERN
from histoalign_wsi.provenance import STAGE_VERSIONS
from histoalign_wsi.run_status import finish_run, start_run
from histoalign_wsi.workflow import bag_file, folder_of, forced_stages_of, load_workflow, results_of

try:
    WF = load_workflow(config)
except ConfigError as exc:  # one line naming the key or value, before any job
    sys.exit(f"histoalign-wsi: {exc}")
R = WF.results
# the slide fingerprints and file hashes learned while the DAG was built (any mode: a dry
# run too), so that the next run only stats the files
atexit.register(WF.save_hashes)
