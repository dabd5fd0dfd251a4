"""The kohya sd-scripts adapter: version detection, launcher, run-time hooks, patches, config bridge."""
