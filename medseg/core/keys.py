"""Dictionary keys shared by datasets, transforms, trainer and predictor."""

IMAGE = "image"
LABEL = "label"
PRED = "pred"
CASE_ID = "case_id"
