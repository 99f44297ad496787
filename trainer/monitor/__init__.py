"""What watches a run: console, trackers, per-step measurements, health, stop requests, sample grids."""
