"""The processes the platform runs beside its own: the Ray that Geneva's jobs run on (`ray`),
and what a dead run worker leaves behind (`processes`). Imports `patches` and `workspace` only."""
