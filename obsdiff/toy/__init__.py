"""The toy text-to-image world: a procedural captioned-shape dataset, the trained toy SD3
pipeline and the attribute classifier behind the toy metrics."""
