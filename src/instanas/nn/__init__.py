"""Building blocks: candidate modules, convolutions for tiny feature maps, row gathers for
sparse execution, and the native-kernel guard."""
