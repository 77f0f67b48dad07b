"""Final numbers on the test set for every model of a run, timed side by side.

InstaNAS (the main model and variants A..E), the MobileNetV2 path at each width, the minimum
network and the random-policy model are all evaluated on the whole test split and timed at
batch 1 on the same images, interleaved image by image in shuffled order, so that drift of the
machine hits every model alike. The oracle bound is computed, not timed (see ``oracle``).

``test_passes.py`` runs each kind of model on the test split, ``oracle.py`` computes the bound and
``results.py`` times them together and assembles results.json.
"""
