"""Pure torch kernels: calibration, leader clustering, assignment, scans and edits. Imports torch and numpy only."""
