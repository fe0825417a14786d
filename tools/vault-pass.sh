#!/bin/sh
# The vault password for ansible.cfg's vault_password_file: read from a file kept OUTSIDE
# the repository, $MORAG_VAULT_PASSWORD_FILE or ~/.morag-vault-pass (tools/new-vault.sh
# creates it). Without that file it prints a placeholder, so that inventories without an
# encrypted vault (inventory/lab) still run; an encrypted vault then fails with
# "Decryption failed": create or copy the password file.
f=${MORAG_VAULT_PASSWORD_FILE:-$HOME/.morag-vault-pass}
if [ -r "$f" ]; then
  exec cat -- "$f"
fi
echo "no-vault-password-file-see-tools-new-vault.sh"
