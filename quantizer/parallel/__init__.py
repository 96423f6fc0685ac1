"""Several processes, one device each: launching / joining torch.distributed, and the
calibration shards whose in-order folds keep any number of processes bit-identical to one."""
