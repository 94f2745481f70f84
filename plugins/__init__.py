"""Built-in components. Each module registers through the ``emofuse`` entry points, like any third-party plugin."""
