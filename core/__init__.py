"""The small core: types, interfaces, plugin registry, config, checkpoints and the engines that use them."""
