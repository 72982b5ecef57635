"""Zero-shot scoring on the feature stores: prompt bags, their text embeddings,
many-to-many alignment with late encoder fusion, cohort calibration, MIL and scale-aware
pooling, and the files this stage hands on (tile scores, predictions)."""
