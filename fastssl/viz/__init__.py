"""Pictures of a run (matplotlib, the optional `viz` extra): curves.png drawn at the end of every
run (fastssl.viz.curves) and the figures of `fastssl viz RUN` (fastssl.viz.figures)."""
