"""``morag-fleet``: the sysadmin's fleet command on the Ansible controller (ansible-runner)."""
