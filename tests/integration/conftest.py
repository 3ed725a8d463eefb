from stack import data_layout_tmp, prefect_server, ray_cluster  # noqa: F401  (fixtures)
