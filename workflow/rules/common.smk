# Shared by the stage files: the validated configuration and cohort (checked before
# anything runs; see histoalign_wsi/workflow.py), and the names the rules use.

from histoalign_wsi.slides.cohort import SLIDE_ID_PATTERN
from histoalign_wsi.workflow import bag_file, folder_of, load_workflow, write_partial_summary

WF = load_workflow(config)  # raises naming the bad key or value
R = WF.results
