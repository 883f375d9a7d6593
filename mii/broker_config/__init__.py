"""What producers and workers agree on: settings, key names, the wire schema.

Import the submodules directly (`mii.broker_config.keys`, `.wire`, `.settings`,
`.connection`); `settings` stays free of redis so `mii.config` can use it.
"""
