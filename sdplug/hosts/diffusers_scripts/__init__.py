"""diffusers' example training scripts as an sdplug host.

The scripts have no plugin API: their step is inline in ``main()``. One source patch per
script (``edits``) inserts calls into ``session`` at the moments every host calls the plan;
``sdplug patch diffusers-examples DIR`` writes it to disk and ``sdplug diffusers`` (``launcher``)
compiles it in memory, so both routes run the same patched source.
"""
