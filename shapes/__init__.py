"""The shapes world: procedural clips of coloured shapes moving on plain backgrounds, the captions that describe
them, and an analytic judge that reads a clip back into a scene.

The Shapes Video node renders it, `kineflow eval` scores generated videos with it, and the trainers learn the
shipped tiny models from it; none of the three depends on another through it.
"""
