//! The CreateContainer hook: the one agent call the proxy decodes.
//!
//! Every other frame passes through byte for byte. A `CreateContainer`
//! request of `grpc.AgentService` is decoded with Kata's own message types,
//! given the annotations the reference's proxy adds, and encoded again:
//!
//! - `io.confidentialcontainers.org.peerpodvolumes.target_path`: the
//!   container's mounts that are CSI volumes published for Kata's direct
//!   volume assignment (a `kubernetes.io~csi` volume path whose
//!   base64url-encoded name is a directory under the direct-volumes
//!   directory), comma-separated. The reference puts a leading comma there
//!   when the first such mount is not the spec's first mount; podvisor does
//!   not.
//! - `cdi.k8s.io/peer-pods` = `nvidia.com/gpu=all` when the container asks
//!   for GPUs (`io.katacontainers.config.hypervisor.default_gpus`).
//!
//! A request that does not decode is relayed unchanged: the agent answers
//! it with its own error, as it would without the proxy.

use crate::protocols::ttrpc::kata::agent::CreateContainerRequest;
use base64::Engine as _;
use protobuf::Message as _;
use std::path::{Path, PathBuf};

/// The agent service and method the hook decodes.
const SERVICE: &[u8] = b"grpc.AgentService";
const METHOD: &[u8] = b"CreateContainer";

/// Mount sources under this path segment are CSI volumes.
const CSI_VOLUMES: &str = "/volumes/kubernetes.io~csi/";
/// The annotation listing a container's direct-assigned CSI volume paths.
pub const VOLUME_TARGET_PATH: &str = "io.confidentialcontainers.org.peerpodvolumes.target_path";
/// The annotation a GPU request sets.
pub const GPUS: &str = crate::kata_annotations::DEFAULT_GPUS;
/// The CDI annotation the pod VM's agent reads.
pub const CDI: &str = "cdi.k8s.io/peer-pods";
/// The CDI device of a GPU request.
pub const CDI_ALL_GPUS: &str = "nvidia.com/gpu=all";
/// Kata's direct-volumes directory.
pub const DEFAULT_DIRECT_VOLUMES_DIR: &str = "/run/kata-containers/shared/direct-volumes";

/// What the hook needs from the node.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Kata's direct-volumes directory.
    pub direct_volumes_dir: PathBuf,
}

impl Default for Hook {
    fn default() -> Self {
        Self {
            direct_volumes_dir: PathBuf::from(DEFAULT_DIRECT_VOLUMES_DIR),
        }
    }
}

impl Hook {
    /// The ttrpc request payload with the hook applied, when it is a
    /// `CreateContainer` that the hook changed; `None` otherwise (relay the
    /// frame as it came).
    pub fn rewrite(&self, request_payload: &[u8]) -> Option<Vec<u8>> {
        let (service, method) = target(request_payload)?;
        if service != SERVICE || method != METHOD {
            return None;
        }
        let mut request = match ttrpc::Request::parse_from_bytes(request_payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "agent proxy: a CreateContainer frame does not decode; relaying it unchanged");
                return None;
            }
        };
        let mut create = match CreateContainerRequest::parse_from_bytes(&request.payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "agent proxy: a CreateContainerRequest does not decode; relaying it unchanged");
                return None;
            }
        };
        let added = self.apply(&mut create);
        if added.is_empty() {
            return None;
        }
        tracing::info!(container = %create.container_id, annotations = ?added, "agent proxy: CreateContainer annotated");
        request.payload = create.write_to_bytes().ok()?;
        request.write_to_bytes().ok()
    }

    /// Adds the annotations; returns the keys it set.
    pub fn apply(&self, req: &mut CreateContainerRequest) -> Vec<&'static str> {
        let Some(spec) = req.OCI.as_mut() else {
            return Vec::new();
        };
        let mut added = Vec::new();
        let volumes: Vec<&str> = spec
            .Mounts
            .iter()
            .map(|m| m.source.as_str())
            .filter(|source| self.is_direct_volume(source))
            .collect();
        if !volumes.is_empty() {
            spec.Annotations
                .insert(VOLUME_TARGET_PATH.to_owned(), volumes.join(","));
            added.push(VOLUME_TARGET_PATH);
        }
        if spec.Annotations.get(GPUS).is_some_and(|v| !v.is_empty()) {
            spec.Annotations
                .insert(CDI.to_owned(), CDI_ALL_GPUS.to_owned());
            added.push(CDI);
        }
        added
    }

    /// A CSI volume published for direct assignment: Kata keeps a directory
    /// named by the base64url of its path.
    fn is_direct_volume(&self, source: &str) -> bool {
        if !clean(source).contains(CSI_VOLUMES) {
            return false;
        }
        let name = base64::engine::general_purpose::URL_SAFE.encode(source);
        Path::new(&self.direct_volumes_dir).join(name).is_dir()
    }
}

/// `source` with repeated and trailing slashes removed (what the reference
/// checks the segment against).
fn clean(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for part in source.split('/').filter(|p| !p.is_empty() && *p != ".") {
        out.push('/');
        out.push_str(part);
    }
    out.push('/');
    out
}

/// The service and method of a ttrpc `Request` (fields 1 and 2), read
/// without copying the payload; `None` if the bytes are not a request.
fn target(mut bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (mut service, mut method) = (None, None);
    while !bytes.is_empty() {
        let (key, rest) = varint(bytes)?;
        bytes = rest;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => bytes = varint(bytes)?.1,
            1 => bytes = bytes.get(8..)?,
            2 => {
                let (len, rest) = varint(bytes)?;
                let len = usize::try_from(len).ok()?;
                let value = rest.get(..len)?;
                bytes = rest.get(len..)?;
                match field {
                    1 => service = Some(value),
                    2 => method = Some(value),
                    _ => {}
                }
                if let (Some(s), Some(m)) = (service, method) {
                    return Some((s, m));
                }
            }
            5 => bytes = bytes.get(4..)?,
            _ => return None,
        }
    }
    None
}

/// A protobuf varint and what follows it.
fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::ttrpc::kata::oci::{Mount, Spec};

    fn request(service: &str, method: &str, payload: Vec<u8>) -> Vec<u8> {
        let mut r = ttrpc::Request::new();
        r.service = service.into();
        r.method = method.into();
        r.payload = payload;
        r.timeout_nano = 5_000_000_000;
        r.write_to_bytes().unwrap()
    }

    fn create(mounts: &[&str], annotations: &[(&str, &str)]) -> CreateContainerRequest {
        let mut spec = Spec::new();
        spec.Mounts = mounts
            .iter()
            .map(|s| Mount {
                source: (*s).into(),
                destination: "/data".into(),
                ..Default::default()
            })
            .collect();
        spec.Annotations = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CreateContainerRequest {
            container_id: "c1".into(),
            OCI: Some(spec).into(),
            ..Default::default()
        }
    }

    fn hook_with_volumes(volumes: &[&str]) -> (tempfile::TempDir, Hook) {
        let dir = tempfile::tempdir().unwrap();
        for v in volumes {
            let name = base64::engine::general_purpose::URL_SAFE.encode(v);
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let hook = Hook {
            direct_volumes_dir: dir.path().to_owned(),
        };
        (dir, hook)
    }

    const VOL_A: &str = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-a/mount";
    const VOL_B: &str = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-b/mount";

    #[test]
    fn direct_volumes_are_listed_without_a_leading_comma() {
        // VOL_B is not published for direct assignment; /etc/hosts is no CSI
        // volume; the first match is not the first mount (the reference's
        // leading-comma case).
        let (_dir, hook) = hook_with_volumes(&[VOL_A, "/etc/hosts"]);
        let mut req = create(&["/etc/hosts", VOL_B, VOL_A], &[]);
        assert_eq!(hook.apply(&mut req), vec![VOLUME_TARGET_PATH]);
        assert_eq!(req.OCI.Annotations[VOLUME_TARGET_PATH], VOL_A);

        let (_dir, hook) = hook_with_volumes(&[VOL_A, VOL_B]);
        let mut req = create(&[VOL_A, "/etc/hosts", VOL_B], &[]);
        hook.apply(&mut req);
        assert_eq!(
            req.OCI.Annotations[VOLUME_TARGET_PATH],
            format!("{VOL_A},{VOL_B}")
        );
    }

    #[test]
    fn a_gpu_request_gets_the_cdi_annotation() {
        let hook = Hook::default();
        let mut req = create(&[], &[(GPUS, "1"), ("keep", "me")]);
        assert_eq!(hook.apply(&mut req), vec![CDI]);
        assert_eq!(req.OCI.Annotations[CDI], CDI_ALL_GPUS);
        assert_eq!(req.OCI.Annotations["keep"], "me");
        let mut req = create(&[], &[(GPUS, "")]);
        assert!(hook.apply(&mut req).is_empty());
        assert!(!req.OCI.Annotations.contains_key(CDI));
    }

    #[test]
    fn only_create_container_is_rewritten_and_the_rest_of_the_request_is_kept() {
        let hook = Hook::default();
        let payload = create(&[], &[(GPUS, "2")]).write_to_bytes().unwrap();
        for (service, method) in [
            ("grpc.AgentService", "StartContainer"),
            ("grpc.Health", "CreateContainer"),
            ("other.Service", "CreateContainer"),
        ] {
            assert!(
                hook.rewrite(&request(service, method, payload.clone()))
                    .is_none()
            );
        }
        let out = hook
            .rewrite(&request("grpc.AgentService", "CreateContainer", payload))
            .expect("rewritten");
        let r = ttrpc::Request::parse_from_bytes(&out).unwrap();
        assert_eq!(r.timeout_nano, 5_000_000_000);
        let c = CreateContainerRequest::parse_from_bytes(&r.payload).unwrap();
        assert_eq!(c.container_id, "c1");
        assert_eq!(c.OCI.Annotations[CDI], CDI_ALL_GPUS);
        assert_eq!(c.OCI.Annotations[GPUS], "2");
    }

    #[test]
    fn nothing_to_add_or_nothing_decodable_leaves_the_frame_alone() {
        let hook = Hook::default();
        // No annotations to add.
        let plain = create(&["/etc/hosts"], &[]).write_to_bytes().unwrap();
        assert!(
            hook.rewrite(&request("grpc.AgentService", "CreateContainer", plain))
                .is_none()
        );
        // No OCI spec at all.
        let bare = CreateContainerRequest::default().write_to_bytes().unwrap();
        assert!(
            hook.rewrite(&request("grpc.AgentService", "CreateContainer", bare))
                .is_none()
        );
        // A payload that is not a CreateContainerRequest, and bytes that
        // are no request.
        assert!(
            hook.rewrite(&request(
                "grpc.AgentService",
                "CreateContainer",
                vec![0xff, 0xff, 0xff]
            ))
            .is_none()
        );
        for junk in [&b""[..], &[0x0a, 0x80][..], &[0x0f][..], &[0xff; 11][..]] {
            assert!(hook.rewrite(junk).is_none());
        }
    }

    #[test]
    fn the_target_reader_agrees_with_the_decoder() {
        let bytes = request("grpc.AgentService", "CreateContainer", vec![1, 2, 3]);
        assert_eq!(
            target(&bytes),
            Some((&b"grpc.AgentService"[..], &b"CreateContainer"[..]))
        );
        // Fields in another order (a valid encoding) are found too.
        let mut reordered = Vec::new();
        reordered.extend_from_slice(&[0x1a, 1, 9]); // payload
        reordered.extend_from_slice(&[0x12, 1, b'M']); // method
        reordered.extend_from_slice(&[0x0a, 1, b'S']); // service
        assert_eq!(target(&reordered), Some((&b"S"[..], &b"M"[..])));
    }

    proptest::proptest! {
        /// Whatever bytes a shim sends, the hook never panics, and it only
        /// ever rewrites a CreateContainer request.
        #[test]
        fn any_bytes_are_safe(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let hook = Hook::default();
            if let Some(out) = hook.rewrite(&bytes) {
                let r = ttrpc::Request::parse_from_bytes(&out).unwrap();
                proptest::prop_assert_eq!(r.service.as_str(), "grpc.AgentService");
                proptest::prop_assert_eq!(r.method.as_str(), "CreateContainer");
            }
        }

        /// On any valid request the cheap reader finds what the decoder
        /// finds.
        #[test]
        fn the_reader_agrees_on_valid_requests(
            service in "[a-zA-Z.]{0,24}",
            method in "[a-zA-Z]{0,24}",
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            timeout in proptest::num::i64::ANY,
        ) {
            let mut r = ttrpc::Request::new();
            r.service = service.clone();
            r.method = method.clone();
            r.payload = payload;
            r.timeout_nano = timeout;
            let bytes = r.write_to_bytes().unwrap();
            match target(&bytes) {
                Some((s, m)) => {
                    proptest::prop_assert_eq!(s, service.as_bytes());
                    proptest::prop_assert_eq!(m, method.as_bytes());
                }
                // proto3 leaves empty strings out: nothing to find.
                None => proptest::prop_assert!(service.is_empty() || method.is_empty()),
            }
        }
    }
}
