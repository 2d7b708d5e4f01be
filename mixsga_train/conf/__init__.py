"""The shipped Hydra configs (``pkg://mixsga_train.conf``): one folder per config group."""
