"""What users open: the cohort table and metrics, heatmaps, QuPath GeoJSON, segmentation
evaluation and the HTML report, all from the zero-shot stage's files."""
