"""Slides: reading (OpenSlide/tiffslide behind one interface, MPP), the cohort and its
ids, tissue detection, nested multi-scale tiling, and generated slides for demos and
tests. The first stage: nothing here imports a later one."""
