#!/bin/sh
# Makes this container a node of a hostfile launch (docker/README.md): sshd on port ${SSH_PORT:-2222}
# letting in the key pair mounted at /keys (msa_key, msa_key.pub), which is also the key this node
# reaches the others with. Runs in the foreground; the container lives as long as it does.
set -eu
install -d -m 700 /root/.ssh
install -m 600 /keys/msa_key.pub /root/.ssh/authorized_keys
install -m 600 /keys/msa_key /root/.ssh/id_ed25519
# pdsh runs ssh in batch mode, which cannot ask about a host key it has not seen: the nodes are new
# to each other, so the first key of each is accepted (and a changed one still refused)
printf 'Host *\n  StrictHostKeyChecking accept-new\n' > /root/.ssh/config
ssh-keygen -A  # this container's host keys: none are baked into the image
exec /usr/sbin/sshd -D -e -p "${SSH_PORT:-2222}"
