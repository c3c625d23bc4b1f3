#!/usr/bin/env python3
"""Drives the IBM Cloud test server (providers/src/ibmcloud/testing.rs) with
IBM's official Python SDKs (ibm-vpc, ibm-platform-services, and their
ibm-cloud-sdk-core), to prove it answers what those SDKs expect: every body
goes through the SDK model's `from_dict`, which raises on any required
property missing.

Usage: ibmcloud_sdk.py <url> <ca_file> <api_key> <profile_id> <cr_token>

Exits 0 when every check passed; otherwise prints what did not match and
exits 1 (2 when the SDKs are not installed).
"""

import os
import sys
import tempfile
import time

try:
    from ibm_cloud_sdk_core import ApiException
    from ibm_cloud_sdk_core.authenticators import ContainerAuthenticator, IAMAuthenticator
    from ibm_platform_services import GlobalSearchV2, GlobalTaggingV1
    from ibm_platform_services.global_search_v2 import ScanResult
    from ibm_platform_services.global_tagging_v1 import Resource, TagList, TagResults
    from ibm_vpc import VpcV1
    from ibm_vpc.vpc_v1 import (
        Image,
        ImageIdentityById,
        Instance,
        InstanceCollection,
        InstanceMetadataServicePrototype,
        InstanceProfile,
        InstanceProfileCollection,
        InstanceProfileIdentityByName,
        InstancePrototypeInstanceByImageInstanceByImageInstanceByNetworkInterface,
        InstancesPager,
        KeyIdentityById,
        NetworkInterfacePrototype,
        ResourceGroupIdentityById,
        SecurityGroupIdentityById,
        DedicatedHost,
        DedicatedHostGroup,
        Subnet,
        SubnetIdentityById,
        VolumeAttachmentPrototypeInstanceByImageContext,
        VolumeProfileIdentityByName,
        VolumePrototypeInstanceByImageContext,
        VPCIdentityById,
        ZoneIdentityByName,
    )
except ImportError as e:
    print(
        f"the IBM Cloud SDKs are not installed ({e}): "
        "pip install ibm-vpc ibm-platform-services (scripts/test.sh does)",
        file=sys.stderr,
    )
    sys.exit(2)

ZONE = "us-south-1"
VPC = "r006-vpc-test"
SUBNET = "0717-subnet-test"
IMAGE = "r006-image-amd64"
SG = "r006-sg-test"
KEY = "r006-key-test"
RG = "rg-test-0123456789abcdef"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def expect_api_error(call, status, code=None):
    """Runs call(); it must raise ApiException `status` (errors[0].code `code`)."""
    try:
        call()
    except ApiException as e:
        check(e.code == status, f"expected HTTP {status}, got {e.code}: {e.message}")
        if code is not None:
            body = e.http_response.json()
            got = body["errors"][0]["code"]
            check(got == code, f"expected error code {code}, got {got} ({body})")
            check(body.get("trace"), f"no trace in the error body {body}")
        return e
    raise AssertionError(f"expected ApiException {status}, the call succeeded")


def prototype(name, boot_volume):
    return InstancePrototypeInstanceByImageInstanceByImageInstanceByNetworkInterface(
        name=name,
        profile=InstanceProfileIdentityByName(name="bx2-2x8"),
        image=ImageIdentityById(id=IMAGE),
        zone=ZoneIdentityByName(name=ZONE),
        vpc=VPCIdentityById(id=VPC),
        primary_network_interface=NetworkInterfacePrototype(
            subnet=SubnetIdentityById(id=SUBNET),
            security_groups=[SecurityGroupIdentityById(id=SG)],
        ),
        keys=[KeyIdentityById(id=KEY)],
        user_data="#cloud-config\n",
        metadata_service=InstanceMetadataServicePrototype(enabled=True),
        resource_group=ResourceGroupIdentityById(id=RG),
        boot_volume_attachment=VolumeAttachmentPrototypeInstanceByImageContext(
            volume=VolumePrototypeInstanceByImageContext(
                name=boot_volume,
                profile=VolumeProfileIdentityByName(name="general-purpose"),
            ),
            delete_volume_on_instance_delete=True,
        ),
    )


def wait_running(vpc, instance_id):
    for _ in range(50):
        got = Instance.from_dict(vpc.get_instance(id=instance_id).get_result())
        if got.status == "running":
            check(
                got.primary_network_interface.primary_ip.address != "0.0.0.0",
                f"running without an address: {got.primary_network_interface.primary_ip.address}",
            )
            return got
        check(got.status == "pending", f"unexpected status {got.status}")
        check(
            got.primary_network_interface.primary_ip.address == "0.0.0.0",
            "a pending instance shows 0.0.0.0",
        )
    raise AssertionError(f"{instance_id} never became running")


def wait_gone(vpc, instance_id):
    for _ in range(20):
        try:
            got = Instance.from_dict(vpc.get_instance(id=instance_id).get_result())
            check(got.status == "deleting", f"a deleted instance is {got.status}")
        except ApiException as e:
            check(e.code == 404, f"expected 404, got {e.code}")
            check(e.http_response.json()["errors"][0]["code"] == "not_found", "not_found")
            return
    raise AssertionError(f"the deleted instance {instance_id} never went")


def main():
    url, ca_file, api_key, profile_id, cr_token = sys.argv[1:6]
    # The IAM token managers verify with requests' default bundle: point it
    # at the server's CA (the services also get it through set_http_config).
    os.environ["REQUESTS_CA_BUNDLE"] = ca_file

    # A wrong API key: IAM's 400, surfaced by the authenticator.
    bad = IAMAuthenticator("not-the-key", url=url)
    try:
        bad.token_manager.get_token()
        raise AssertionError("a wrong API key got a token")
    except ApiException as e:
        check(e.code == 400, f"a wrong API key: expected 400, got {e.code}")
        check(e.http_response.json().get("errorCode") == "BXNIM0415E", "IAM errorCode BXNIM0415E")

    auth = IAMAuthenticator(api_key, url=url)
    vpc = VpcV1(authenticator=auth)
    vpc.set_service_url(url + "/v1")
    vpc.set_http_config({"verify": ca_file})

    # The resources an instance names.
    Image.from_dict(vpc.get_image(id=IMAGE).get_result())
    InstanceProfile.from_dict(vpc.get_instance_profile(name="bx2-2x8").get_result())
    gpu = InstanceProfile.from_dict(vpc.get_instance_profile(name="gx2-8x64x1v100").get_result())
    check(gpu.to_dict().get("gpu_count", {}).get("value") == 1, "the GPU profile has 1 GPU")
    profiles = InstanceProfileCollection.from_dict(vpc.list_instance_profiles().get_result())
    check(len(profiles.profiles) >= 5, f"profiles: {len(profiles.profiles)}")
    Subnet.from_dict(vpc.get_subnet(id=SUBNET).get_result())
    host = DedicatedHost.from_dict(vpc.get_dedicated_host(id="0717-host-1").get_result())
    check(host.zone.name == "us-south-1", f"dedicated host zone: {host.zone.name}")
    group = DedicatedHostGroup.from_dict(vpc.get_dedicated_host_group(id="0717-group-1").get_result())
    check(group.zone.name == "us-south-1", f"dedicated host group zone: {group.zone.name}")
    expect_api_error(lambda: vpc.get_dedicated_host(id="0717-no-such-host"), 404)
    expect_api_error(lambda: vpc.get_image(id="r006-no-such-image"), 404)

    # Create two instances; the first is pending with 0.0.0.0.
    suffix = str(os.getpid())
    created = []
    for i in range(2):
        response = vpc.create_instance(prototype(f"podvm-sdk-{suffix}-{i}", f"pv-sdk-{suffix}-{i}"))
        check(response.get_status_code() == 201, f"create: {response.get_status_code()}")
        instance = Instance.from_dict(response.get_result())
        check(instance.status == "pending", f"a new instance is {instance.status}")
        check(
            instance.primary_network_interface.primary_ip.address == "0.0.0.0",
            "a new instance has no address yet",
        )
        check(instance.crn.startswith(f"crn:v1:bluemix:public:is:{ZONE}:a/"), instance.crn)
        check(instance.crn.endswith(f"::instance:{instance.id}"), instance.crn)
        check(instance.boot_volume_attachment.volume.name == f"pv-sdk-{suffix}-{i}", "boot volume name")
        created.append(instance)

    running = wait_running(vpc, created[0].id)
    check(running.name == created[0].name, "the same instance")

    # The name is unique in the region: a second create is refused.
    e = expect_api_error(
        lambda: vpc.create_instance(prototype(created[0].name, f"pv-sdk-{suffix}-other")),
        400,
        "validation_unique_failed",
    )
    # So is the boot volume's name.
    expect_api_error(
        lambda: vpc.create_instance(prototype(f"podvm-sdk-{suffix}-other", f"pv-sdk-{suffix}-0")),
        400,
        "validation_unique_failed",
    )
    del e

    # Listing, one per page, through the SDK's pager (it follows next.href).
    pager = InstancesPager(client=vpc, limit=1, vpc_id=VPC, resource_group_id=RG)
    listed = []
    pages = 0
    while pager.has_next():
        page = pager.get_next()
        pages += 1
        check(len(page) <= 1, f"a page of limit 1 had {len(page)}")
        for item in page:
            listed.append(Instance.from_dict(item).id)
    check(pages >= 2, f"expected several pages, got {pages}")
    check({c.id for c in created} <= set(listed), f"listed {listed}")
    collection = InstanceCollection.from_dict(vpc.list_instances(limit=1).get_result())
    check(collection.total_count >= 2 and collection.next is not None, "first page has next")
    by_name = InstanceCollection.from_dict(vpc.list_instances(name=created[1].name).get_result())
    check([i.id for i in by_name.instances] == [created[1].id], "list by name")

    # Tags: attach, read back (lowercased), find through Global Search.
    tagging = GlobalTaggingV1(authenticator=auth)
    tagging.set_service_url(url)
    tagging.set_http_config({"verify": ca_file})
    crn = created[0].crn
    results = TagResults.from_dict(
        tagging.attach_tag(
            resources=[Resource(resource_id=crn)],
            tag_names=["coco-pod-vm:Test", f"podvisor-node:sdk-{suffix}"],
            tag_type="user",
        ).get_result()
    )
    check([r.is_error for r in results.results] == [False], f"attach: {results.to_dict()}")
    missing = TagResults.from_dict(
        tagging.attach_tag(
            resources=[Resource(resource_id=crn + "-gone")], tag_names=["x:y"], tag_type="user"
        ).get_result()
    )
    check([r.is_error for r in missing.results] == [True], "an unknown resource is is_error")
    expect_api_error(
        lambda: tagging.attach_tag(resources=[Resource(resource_id=crn)], tag_names=["bad/tag"]),
        400,
    )
    tags = TagList.from_dict(tagging.list_tags(attached_to=crn).get_result())
    names = sorted(t.name for t in tags.items)
    check(names == sorted(["coco-pod-vm:test", f"podvisor-node:sdk-{suffix}"]), f"tags {names}")

    search = GlobalSearchV2(authenticator=auth)
    search.set_service_url(url)
    search.set_http_config({"verify": ca_file})
    query = f'type:instance AND tags:"podvisor-node:sdk-{suffix}"'
    found = ScanResult.from_dict(
        search.search(query=query, fields=["crn", "name", "tags"], limit=1).get_result()
    )
    check([i.crn for i in found.items] == [crn], f"search found {found.to_dict()}")
    check(found.items[0].get_properties().get("name") == created[0].name, "search name field")
    # Cursor paging over every instance.
    seen = []
    cursor = None
    for _ in range(10):
        page = ScanResult.from_dict(
            search.search(query="type:instance", fields=["crn"], limit=1, search_cursor=cursor).get_result()
        )
        seen.extend(i.crn for i in page.items)
        cursor = page.search_cursor
        if len(page.items) < 1 or not cursor:
            break
    check({c.crn for c in created} <= set(seen), f"paged search saw {seen}")

    # A trusted profile's compute-resource token works as well as a key.
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(cr_token)
        token_file = f.name
    try:
        container = ContainerAuthenticator(
            cr_token_filename=token_file, iam_profile_id=profile_id, url=url
        )
        vpc2 = VpcV1(authenticator=container)
        vpc2.set_service_url(url + "/v1")
        vpc2.set_http_config({"verify": ca_file})
        Instance.from_dict(vpc2.get_instance(id=created[1].id).get_result())
    finally:
        os.unlink(token_file)

    # Delete: 204, then gone (404 not_found) once the deleting reads pass.
    for instance in created:
        response = vpc.delete_instance(id=instance.id)
        check(response.get_status_code() == 204, f"delete: {response.get_status_code()}")
    for instance in created:
        wait_gone(vpc, instance.id)
    expect_api_error(lambda: vpc.delete_instance(id=created[1].id), 404, "not_found")
    print("ibmcloud_sdk.py: all checks passed")


if __name__ == "__main__":
    started = time.time()
    try:
        main()
    except AssertionError as e:
        print(f"ibmcloud_sdk.py: MISMATCH: {e}", file=sys.stderr)
        sys.exit(1)
    except (ApiException, ValueError, KeyError, TypeError) as e:
        import traceback

        traceback.print_exc()
        print(f"ibmcloud_sdk.py: MISMATCH: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
