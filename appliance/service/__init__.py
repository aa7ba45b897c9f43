"""The unattended appliance: inbox watcher, intake and quarantine, time window, sd_notify."""
