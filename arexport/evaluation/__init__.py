"""`arexport eval`: image quality of generated images (FID, precision/recall, IS) and methods x options sweeps.

`features` turns images into feature vectors with a packaged network (no download at run time),
`metrics` compares two feature sets or a feature set with reference statistics, `sweep` runs a
generator over several methods and options and writes one speed/quality table and a Pareto plot.
"""
