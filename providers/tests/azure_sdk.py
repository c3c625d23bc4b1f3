#!/usr/bin/env python3
"""Drives the Azure test server (providers/src/azure/testing.rs) with
Microsoft's official Python SDK (azure-identity with MSAL, azure-mgmt-compute,
azure-mgmt-network, on azure-core), to prove it answers what that SDK
expects: MSAL's authority discovery and token request, the SDK's own
long-running-operation poller (Azure-AsyncOperation, Location) and pager
(nextLink), its error mapping (ResourceNotFoundError, ClientAuthenticationError,
ResourceExistsError, HttpResponseError with the service's code) and its
retry policy (429 with Retry-After).

Usage: azure_sdk.py <url> <ca_file> <tenant> <client> <secret> <subscription>
                    <resource_group> <region> <subnet_id> <image_id>
                    [<federated_token>]

The server must have been started with: VM list pages of 1 VM, the next
create scripted to fail with OSProvisioningTimedOut, and one 429
(Retry-After: 1) on the VM sizes listing (the Rust side does this).

Exits 0 when every check passed; otherwise prints what did not match and
exits 1 (2 when the SDK is not installed).
"""

import os
import sys
import tempfile
import time

try:
    from azure.core import MatchConditions
    from azure.core.credentials import AccessToken
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceNotFoundError,
    )
    from azure.identity import ClientSecretCredential, WorkloadIdentityCredential
    from azure.mgmt.compute import ComputeManagementClient
    from azure.mgmt.network import NetworkManagementClient
except ImportError as e:
    print(
        f"the Azure SDK is not installed ({e}): "
        "pip install azure-identity azure-mgmt-compute azure-mgmt-network (scripts/test.sh does)",
        file=sys.stderr,
    )
    sys.exit(2)

SCOPE = "https://management.azure.com/.default"
FAILED_CODE = "OSProvisioningTimedOut"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def error_code(e):
    """The service's error code of an azure-core HttpResponseError."""
    if getattr(e, "error", None) is not None and getattr(e.error, "code", None):
        return e.error.code
    try:
        body = e.response.json()
    except Exception:  # noqa: BLE001 - any unparsable body has no code
        return None
    return (body.get("error") or {}).get("code") if isinstance(body, dict) else None


def expect(call, exception, code=None):
    """Runs call(); it must raise `exception` (with the service's `code`)."""
    try:
        call()
    except exception as e:
        if code is not None:
            got = error_code(e)
            check(got == code, f"expected error code {code}, got {got}: {e}")
        return e
    raise AssertionError(f"expected {exception.__name__}, the call succeeded")


class BogusCredential:
    """A credential whose tokens the server never issued."""

    def get_token(self, *scopes, **kwargs):
        return AccessToken("eyJ0eXAiOiJKV1QifQ.eyJub3QiOiJpc3N1ZWQifQ.c2ln", int(time.time()) + 3600)


def vm_body(region, subnet, image, name, public_ip=False, user_data="I2Nsb3VkLWNvbmZpZwo="):
    """A create in ARM's REST shape, as the podvisor provider sends it."""
    ipconfig = {"primary": True, "subnet": {"id": subnet}}
    if public_ip:
        ipconfig["publicIPAddressConfiguration"] = {
            "name": f"{name}-ip",
            "properties": {"deleteOption": "Delete"},
        }
    return {
        "location": region,
        "tags": {"podvisor-node": "sdk-node", "podvisor-pod": name},
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_D2as_v5"},
            "storageProfile": {
                "imageReference": {"id": image},
                "osDisk": {
                    "name": f"{name}-disk",
                    "createOption": "FromImage",
                    "deleteOption": "Delete",
                    "managedDisk": {"storageAccountType": "Standard_LRS"},
                },
            },
            "osProfile": {
                "computerName": name,
                "adminUsername": "peerpod",
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {
                        "publicKeys": [
                            {
                                "path": "/home/peerpod/.ssh/authorized_keys",
                                "keyData": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPodvisorTestKeyOnly test",
                            }
                        ]
                    },
                },
            },
            "networkProfile": {
                "networkApiVersion": "2020-11-01",
                "networkInterfaceConfigurations": [
                    {
                        "name": f"{name}-net",
                        "properties": {
                            "primary": True,
                            "deleteOption": "Delete",
                            "ipConfigurations": [{"name": "ipconfig", "properties": ipconfig}],
                        },
                    }
                ],
            },
            "securityProfile": {
                "securityType": "ConfidentialVM",
                "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True},
            },
            "userData": user_data,
        },
    }


def main():
    url, ca_file, tenant, client, secret, subscription, rg, region, subnet, image = sys.argv[1:11]
    federated = sys.argv[11] if len(sys.argv) > 11 else None
    transport = {"connection_verify": ca_file}
    authority = {"authority": url, "disable_instance_discovery": True, **transport}

    # Entra ID: a wrong secret is refused with AADSTS7000215; the right one
    # gets a token (MSAL reads the tenant's OpenID configuration first).
    wrong = ClientSecretCredential(tenant, client, "not-the-secret", **authority)
    e = expect(lambda: wrong.get_token(SCOPE), ClientAuthenticationError)
    check("AADSTS7000215" in str(e), f"a wrong secret: {e}")
    credential = ClientSecretCredential(tenant, client, secret, **authority)
    token = credential.get_token(SCOPE)
    check(token.token.count(".") == 2, "the access token is JWT-shaped")
    check(token.expires_on > time.time() + 3000, f"expires_on {token.expires_on}")

    options = {
        "base_url": url,
        "credential_scopes": [SCOPE],
        "polling_interval": 0.05,
        "retry_total": 0,
        **transport,
    }
    compute = ComputeManagementClient(credential, subscription, **options)
    network = NetworkManagementClient(credential, subscription, **options)

    # The VM sizes, through a client that retries: the server's first answer
    # is a 429 with Retry-After, which azure-core's retry policy honours.
    retrying = ComputeManagementClient(
        credential, subscription, **{**options, "retry_total": 2, "retry_backoff_factor": 0.05}
    )
    started = time.time()
    sizes = {s.name: s for s in retrying.virtual_machine_sizes.list(region)}
    check(time.time() - started >= 0.9, "the 429's Retry-After was waited for")
    check("Standard_D2as_v5" in sizes, f"sizes: {sorted(sizes)}")
    d2 = sizes["Standard_D2as_v5"]
    check(d2.number_of_cores == 2 and d2.memory_in_mb == 8192, f"D2as_v5: {d2}")
    check(d2.os_disk_size_in_mb == 1047552, f"osDiskSizeInMB {d2.os_disk_size_in_mb}")
    check(len(list(compute.virtual_machine_sizes.list(region))) == len(sizes), "sizes twice")

    # What a VM names: the image (managed, then gallery version) and subnet.
    managed = compute.images.get(rg, image.rsplit("/", 1)[-1])
    check(managed.id.lower() == image.lower(), f"image id {managed.id}")
    check(managed.provisioning_state == "Succeeded", "image provisioned")
    version = compute.gallery_image_versions.get(rg, "podvm", "podvm", "1.0.0")
    check(version.name == "1.0.0", f"gallery version {version.name}")
    expect(lambda: compute.images.get(rg, "no-such-image"), ResourceNotFoundError, "ResourceNotFound")
    parts = subnet.split("/")
    got_subnet = network.subnets.get(rg, parts[-3], parts[-1])
    check(got_subnet.address_prefix == "127.23.0.0/24", f"subnet prefix {got_subnet.address_prefix}")

    suffix = str(os.getpid())
    names = [f"podvm-sdk-{suffix}-{i}" for i in range(3)]

    # A create scripted to fail: the poller raises with the service's code,
    # and the VM stays, Failed.
    poller = compute.virtual_machines.begin_create_or_update(
        rg, names[2], vm_body(region, subnet, image, names[2])
    )
    e = expect(poller.result, HttpResponseError)
    check(FAILED_CODE in str(e), f"a failed create: {e}")
    check(poller.status().lower() == "failed", f"failed poller status {poller.status()}")
    failed = compute.virtual_machines.get(rg, names[2])
    check(failed.provisioning_state == "Failed", f"failed VM state {failed.provisioning_state}")

    # Two creates the SDK's poller follows to Succeeded.
    created = []
    for i, name in enumerate(names[:2]):
        poller = compute.virtual_machines.begin_create_or_update(
            rg, name, vm_body(region, subnet, image, name, public_ip=i == 1)
        )
        vm = poller.result()
        check(poller.status() == "Succeeded", f"poller status {poller.status()}")
        check(vm.provisioning_state == "Succeeded", f"created VM state {vm.provisioning_state}")
        check(vm.name == name and vm.location == region, f"created VM {vm.name} {vm.location}")
        check(vm.tags == {"podvisor-node": "sdk-node", "podvisor-pod": name}, f"tags {vm.tags}")
        check(vm.vm_id and len(vm.vm_id) == 36, f"vmId {vm.vm_id}")
        check(vm.time_created is not None, "timeCreated parses")
        nic = vm.network_profile.network_interfaces[0]
        check(nic.id.endswith(f"/networkInterfaces/{name}-net"), f"NIC id {nic.id}")
        check(nic.delete_option == "Delete", f"NIC deleteOption {nic.delete_option}")
        check(vm.storage_profile.os_disk.name == f"{name}-disk", "OS disk name")
        check(vm.security_profile.security_type == "ConfidentialVM", "securityProfile echoed")
        created.append(vm)

    # If-None-Match: * on an existing VM: 412, mapped to ResourceExistsError.
    expect(
        lambda: compute.virtual_machines.begin_create_or_update(
            rg, names[0], vm_body(region, subnet, image, names[0]),
            match_condition=MatchConditions.IfMissing,
        ),
        ResourceExistsError,
        "PreconditionFailed",
    )
    # A size the region lacks, an image that does not exist.
    bad_size = vm_body(region, subnet, image, "podvm-sdk-bad")
    bad_size["properties"]["hardwareProfile"]["vmSize"] = "Standard_NoSuch_v9"
    e = expect(
        lambda: compute.virtual_machines.begin_create_or_update(rg, "podvm-sdk-bad", bad_size),
        HttpResponseError,
        "InvalidParameter",
    )
    check(e.status_code == 400 and e.error.target == "vmSize", f"bad size: {e.status_code} {e.error}")
    bad_image = vm_body(region, subnet, image + "-gone", "podvm-sdk-bad")
    expect(
        lambda: compute.virtual_machines.begin_create_or_update(rg, "podvm-sdk-bad", bad_image),
        ResourceNotFoundError,
        "NotFound",
    )

    # Reads: the VM, with userData and the instance view on request.
    got = compute.virtual_machines.get(rg, names[0])
    check(got.provisioning_state == "Succeeded", f"get: {got.provisioning_state}")
    check(got.user_data is None, "userData only with $expand=userData")
    got = compute.virtual_machines.get(rg, names[0], expand="userData")
    check(got.user_data == "I2Nsb3VkLWNvbmZpZwo=", f"userData {got.user_data}")
    view = compute.virtual_machines.get(rg, names[0], expand="instanceView").instance_view
    codes = [s.code for s in view.statuses]
    check("PowerState/running" in codes, f"instance view statuses {codes}")
    expect(lambda: compute.virtual_machines.get(rg, "podvm-sdk-none"), ResourceNotFoundError, "ResourceNotFound")

    # The listing, one VM per page: the SDK's pager follows nextLink.
    pages = 0
    listed = []
    for page in compute.virtual_machines.list(rg).by_page():
        pages += 1
        items = list(page)
        check(len(items) <= 1, f"a page of {len(items)}")
        listed.extend(vm.name for vm in items)
    check(set(names) <= set(listed), f"listed {listed}")
    check(pages >= 3, f"pages {pages}")

    # The network side: the NIC and its private address, the public IP.
    nic = network.network_interfaces.get(rg, f"{names[0]}-net")
    address = nic.ip_configurations[0].private_ip_address
    check(address.startswith("127.23.0."), f"private address {address}")
    check(nic.ip_configurations[0].subnet.id.lower() == subnet.lower(), "NIC subnet")
    check(nic.virtual_machine.id.lower() == created[0].id.lower(), "NIC's VM")
    nic1 = network.network_interfaces.get(rg, f"{names[1]}-net")
    ip_ref = nic1.ip_configurations[0].public_ip_address
    check(ip_ref is not None and ip_ref.id.endswith(f"/publicIPAddresses/{names[1]}-ip"), f"IP ref {ip_ref}")
    public = network.public_ip_addresses.get(rg, f"{names[1]}-ip")
    check(public.ip_address.startswith("127.24.0."), f"public address {public.ip_address}")
    disk = compute.disks.get(rg, f"{names[0]}-disk")
    check(disk.disk_state == "Attached" and disk.managed_by.lower() == created[0].id.lower(), "disk attached")

    # Workload identity: a federated token file gets a token too.
    if federated:
        with tempfile.NamedTemporaryFile("w", suffix=".jwt", delete=False) as f:
            f.write(federated)
            token_file = f.name
        try:
            workload = WorkloadIdentityCredential(
                tenant_id=tenant, client_id=client, token_file_path=token_file, **authority
            )
            compute2 = ComputeManagementClient(workload, subscription, **options)
            check(compute2.virtual_machines.get(rg, names[1]).name == names[1], "federated get")
        finally:
            os.unlink(token_file)

    # A token ARM never issued: 401 InvalidAuthenticationToken.
    bogus = ComputeManagementClient(BogusCredential(), subscription, **options)
    expect(lambda: bogus.virtual_machines.get(rg, names[0]), ClientAuthenticationError, "InvalidAuthenticationToken")

    # Deletes: the poller follows Azure-AsyncOperation, then the Location;
    # the VM, its NIC, disk and public IP are gone.
    for name in names:
        poller = compute.virtual_machines.begin_delete(rg, name)
        check(poller.result() is None, "delete's result")
        check(poller.status() == "Succeeded", f"delete poller {poller.status()}")
        expect(lambda: compute.virtual_machines.get(rg, name), ResourceNotFoundError, "ResourceNotFound")
        expect(lambda: network.network_interfaces.get(rg, f"{name}-net"), ResourceNotFoundError, "ResourceNotFound")
        expect(lambda: compute.disks.get(rg, f"{name}-disk"), ResourceNotFoundError, "ResourceNotFound")
    expect(lambda: network.public_ip_addresses.get(rg, f"{names[1]}-ip"), ResourceNotFoundError)
    # Deleting what does not exist succeeds (ARM's 204).
    compute.virtual_machines.begin_delete(rg, names[0]).result()
    check(list(compute.virtual_machines.list(rg)) == [], "no VM left")
    print("azure_sdk.py: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"azure_sdk.py: MISMATCH: {e}", file=sys.stderr)
        sys.exit(1)
    except (HttpResponseError, ClientAuthenticationError, ValueError, KeyError, TypeError, AttributeError) as e:
        import traceback

        traceback.print_exc()
        print(f"azure_sdk.py: MISMATCH: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
