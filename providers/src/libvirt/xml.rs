//! The XML podvisor writes to and reads from libvirt: domain definitions for
//! the three architectures the reference supports, storage volumes, the
//! podvisor `<metadata>` element, and the few facts read back from a host's
//! capabilities and from a defined domain.
//!
//! Written as text with every value escaped; read with `roxmltree`.

use podvisor_state::UnixMillis;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The XML namespace of podvisor's element in a domain's `<metadata>`.
pub const METADATA_NAMESPACE: &str = "https://podvisor.io/xmlns/libvirt/instance/1";
/// The namespace prefix used when writing that element.
pub const METADATA_PREFIX: &str = "podvisor";

/// Escapes text for an XML attribute value or element content.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A storage volume a pod VM owns (deleted with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedVolume {
    /// The storage pool.
    pub pool: String,
    /// The volume's name in the pool.
    pub name: String,
}

/// What podvisor keeps in a domain's `<metadata>`: how instances are found
/// (by token), listed (by node) and garbage-collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceMetadata {
    /// The idempotency token the domain was created with.
    pub token: String,
    /// The node whose daemon owns it.
    pub node: String,
    /// The Kata sandbox id.
    pub sandbox: String,
    /// When podvisor defined it.
    pub created_at: UnixMillis,
    /// Every tag of the create request.
    pub tags: BTreeMap<String, String>,
    /// The volumes made for it, deleted with it.
    pub volumes: Vec<OwnedVolume>,
}

impl InstanceMetadata {
    /// The element, with its namespace declared, for a domain's `<metadata>`.
    pub fn to_xml(&self) -> String {
        let p = METADATA_PREFIX;
        let mut x = format!(
            "<{p}:instance xmlns:{p}=\"{}\">",
            escape(METADATA_NAMESPACE)
        );
        let _ = write!(
            x,
            "<{p}:token>{}</{p}:token><{p}:node>{}</{p}:node><{p}:sandbox>{}</{p}:sandbox>\
             <{p}:created-at>{}</{p}:created-at>",
            escape(&self.token),
            escape(&self.node),
            escape(&self.sandbox),
            self.created_at
        );
        for (key, value) in &self.tags {
            let _ = write!(
                x,
                "<{p}:tag key=\"{}\">{}</{p}:tag>",
                escape(key),
                escape(value)
            );
        }
        for v in &self.volumes {
            let _ = write!(
                x,
                "<{p}:volume pool=\"{}\">{}</{p}:volume>",
                escape(&v.pool),
                escape(&v.name)
            );
        }
        let _ = write!(x, "</{p}:instance>");
        x
    }

    /// Reads the element back, as `virDomainGetMetadata` returns it (with or
    /// without the prefix).
    pub fn parse(xml: &str) -> Result<Self, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
        let root = doc.root_element();
        if root.tag_name().name() != "instance" {
            return Err(format!(
                "expected <instance>, found <{}>",
                root.tag_name().name()
            ));
        }
        let text = |name: &str| -> Option<String> {
            root.children()
                .find(|n| n.is_element() && n.tag_name().name() == name)
                .map(|n| n.text().unwrap_or_default().to_owned())
        };
        let token = text("token").ok_or("no <token>")?;
        if token.is_empty() {
            return Err("an empty <token>".into());
        }
        let created_at = match text("created-at") {
            Some(t) => t
                .trim()
                .parse()
                .map_err(|_| format!("<created-at> '{t}' is not a number"))?,
            None => 0,
        };
        let mut tags = BTreeMap::new();
        let mut volumes = Vec::new();
        for n in root.children().filter(roxmltree::Node::is_element) {
            match n.tag_name().name() {
                "tag" => {
                    let key = n.attribute("key").ok_or("a <tag> without a key")?;
                    tags.insert(key.to_owned(), n.text().unwrap_or_default().to_owned());
                }
                "volume" => {
                    let pool = n.attribute("pool").ok_or("a <volume> without a pool")?;
                    let name = n.text().unwrap_or_default();
                    if name.is_empty() {
                        return Err("a <volume> without a name".into());
                    }
                    volumes.push(OwnedVolume {
                        pool: pool.to_owned(),
                        name: name.to_owned(),
                    });
                }
                _ => {}
            }
        }
        Ok(Self {
            token,
            node: text("node").unwrap_or_default(),
            sandbox: text("sandbox").unwrap_or_default(),
            created_at,
            tags,
            volumes,
        })
    }
}

/// The guest architectures podvisor writes domains for (the reference's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// q35, OVMF, SATA disks.
    X86_64,
    /// `virt` machine, UEFI, virtio disks, the cidata CD-ROM on virtio-scsi.
    Aarch64,
    /// s390-ccw-virtio, virtio disks, no firmware; IBM Secure Execution (PV).
    S390x,
}

impl Arch {
    /// The libvirt arch name.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::S390x => "s390x",
        }
    }

    /// The guest arch for a host arch. `i686` is taken as x86: it is what
    /// libvirt's test driver reports, and its domains are x86_64 ones.
    pub fn for_host(host_arch: &str) -> Option<Arch> {
        match host_arch {
            "x86_64" | "i686" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            "s390x" => Some(Arch::S390x),
            _ => None,
        }
    }
}

/// What a host's capabilities say about where pod VMs can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The host CPU's arch, as libvirt names it.
    pub host_arch: String,
    /// The domain type to ask for: `kvm` where offered, else `qemu` (TCG),
    /// else the driver's own (`test`).
    pub domain_type: String,
}

/// Reads `virConnectGetCapabilities`: the host arch, and the best domain
/// type for an HVM guest of that arch.
pub fn host_facts(capabilities: &str) -> Result<HostFacts, String> {
    let doc = roxmltree::Document::parse(capabilities).map_err(|e| e.to_string())?;
    let host_arch = doc
        .descendants()
        .find(|n| n.has_tag_name("host"))
        .and_then(|h| h.children().find(|n| n.has_tag_name("cpu")))
        .and_then(|c| c.children().find(|n| n.has_tag_name("arch")))
        .and_then(|a| a.text())
        .map(|t| t.trim().to_owned())
        .ok_or("the capabilities name no host arch")?;
    let guest_arch: String = match Arch::for_host(&host_arch) {
        Some(arch) => arch.as_str().to_owned(),
        None => host_arch.clone(),
    };
    let mut for_arch = Vec::new();
    let mut any = Vec::new();
    for guest in doc.descendants().filter(|n| n.has_tag_name("guest")) {
        let hvm = guest
            .children()
            .find(|n| n.has_tag_name("os_type"))
            .and_then(|n| n.text())
            == Some("hvm");
        if !hvm {
            continue;
        }
        for arch in guest.children().filter(|n| n.has_tag_name("arch")) {
            let types = arch
                .children()
                .filter(|n| n.has_tag_name("domain"))
                .filter_map(|d| d.attribute("type").map(str::to_owned));
            if arch.attribute("name") == Some(guest_arch.as_str()) {
                for_arch.extend(types);
            } else {
                any.extend(types);
            }
        }
    }
    let candidates = if for_arch.is_empty() { any } else { for_arch };
    let domain_type = ["kvm", "qemu"]
        .iter()
        .find(|t| candidates.iter().any(|c| c == *t))
        .map(|t| (*t).to_owned())
        .or_else(|| candidates.first().cloned())
        .ok_or_else(|| format!("the host offers no HVM guests for {guest_arch}"))?;
    Ok(HostFacts {
        host_arch,
        domain_type,
    })
}

/// Everything a domain definition is made of.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// The domain name (the instance name).
    pub name: String,
    /// The domain UUID (the instance id).
    pub uuid: String,
    /// `kvm`, `qemu` or the driver's own type.
    pub domain_type: String,
    /// The guest architecture.
    pub arch: Arch,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Host CPUs the vCPUs may run on (libvirt cpuset syntax), if pinned.
    pub cpuset: Option<String>,
    /// UEFI firmware (x86_64, aarch64), if any.
    pub firmware: Option<String>,
    /// IBM Secure Execution (`<launchSecurity type='s390-pv'/>`).
    pub s390_pv: bool,
    /// The pool of both volumes.
    pub pool: String,
    /// The root disk: the qcow2 overlay.
    pub root_volume: String,
    /// The NoCloud cidata ISO.
    pub cidata_volume: String,
    /// The libvirt network of the NIC.
    pub network: String,
    /// podvisor's `<metadata>` element.
    pub metadata: InstanceMetadata,
}

/// The domain XML for `spec`.
pub fn domain_xml(spec: &DomainSpec) -> String {
    let e = escape;
    let mut x = String::with_capacity(2048);
    let _ = write!(
        x,
        "<domain type=\"{}\">\n  <name>{}</name>\n  <uuid>{}</uuid>\n  <metadata>{}</metadata>\n  \
         <memory unit=\"MiB\">{}</memory>\n",
        e(&spec.domain_type),
        e(&spec.name),
        e(&spec.uuid),
        spec.metadata.to_xml(),
        spec.memory_mib
    );
    match &spec.cpuset {
        Some(set) => {
            let _ = writeln!(
                x,
                "  <vcpu placement=\"static\" cpuset=\"{}\">{}</vcpu>",
                e(set),
                spec.vcpus
            );
        }
        None => {
            let _ = writeln!(x, "  <vcpu placement=\"static\">{}</vcpu>", spec.vcpus);
        }
    }
    let machine = match spec.arch {
        Arch::X86_64 => "q35",
        Arch::Aarch64 => "virt",
        Arch::S390x => "s390-ccw-virtio",
    };
    let _ = write!(
        x,
        "  <os>\n    <type arch=\"{}\" machine=\"{machine}\">hvm</type>\n",
        spec.arch.as_str()
    );
    if spec.arch != Arch::S390x {
        if let Some(fw) = &spec.firmware {
            let _ = writeln!(
                x,
                "    <loader readonly=\"yes\" type=\"pflash\">{}</loader>",
                e(fw)
            );
        }
        x.push_str("    <boot dev=\"hd\"/>\n");
    }
    x.push_str("  </os>\n");
    if spec.arch != Arch::S390x {
        x.push_str("  <features>\n    <acpi/>\n");
        if spec.arch == Arch::X86_64 {
            x.push_str("    <apic/>\n");
        }
        x.push_str("  </features>\n");
    }
    if spec.domain_type == "kvm" {
        x.push_str("  <cpu mode=\"host-passthrough\"/>\n");
    } else if spec.arch == Arch::Aarch64 {
        // TCG has no host CPU to pass through.
        x.push_str("  <cpu mode=\"maximum\"/>\n");
    }
    if spec.s390_pv {
        x.push_str("  <launchSecurity type=\"s390-pv\"/>\n");
    }
    x.push_str(
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
         <on_crash>destroy</on_crash>\n  <devices>\n",
    );
    let (pool, root, cidata) = (e(&spec.pool), e(&spec.root_volume), e(&spec.cidata_volume));
    match spec.arch {
        Arch::X86_64 => {
            let _ = write!(
                x,
                "    <disk type=\"volume\" device=\"disk\">\n      <driver name=\"qemu\" type=\"qcow2\"/>\n      \
                 <source pool=\"{pool}\" volume=\"{root}\"/>\n      <target dev=\"sda\" bus=\"sata\"/>\n    </disk>\n    \
                 <disk type=\"volume\" device=\"cdrom\">\n      <driver name=\"qemu\" type=\"raw\"/>\n      \
                 <source pool=\"{pool}\" volume=\"{cidata}\"/>\n      <target dev=\"sdb\" bus=\"sata\"/>\n      \
                 <readonly/>\n    </disk>\n"
            );
        }
        Arch::Aarch64 => {
            let _ = write!(
                x,
                "    <disk type=\"volume\" device=\"disk\">\n      <driver name=\"qemu\" type=\"qcow2\"/>\n      \
                 <source pool=\"{pool}\" volume=\"{root}\"/>\n      <target dev=\"vda\" bus=\"virtio\"/>\n    </disk>\n    \
                 <disk type=\"volume\" device=\"cdrom\">\n      <driver name=\"qemu\" type=\"raw\"/>\n      \
                 <source pool=\"{pool}\" volume=\"{cidata}\"/>\n      <target dev=\"sda\" bus=\"scsi\"/>\n      \
                 <readonly/>\n    </disk>\n    <controller type=\"scsi\" model=\"virtio-scsi\"/>\n"
            );
        }
        Arch::S390x => {
            // No CD-ROM on the channel subsystem: the ISO is a read-only disk.
            let _ = write!(
                x,
                "    <disk type=\"volume\" device=\"disk\">\n      <driver name=\"qemu\" type=\"qcow2\"/>\n      \
                 <source pool=\"{pool}\" volume=\"{root}\"/>\n      <target dev=\"vda\" bus=\"virtio\"/>\n      \
                 <boot order=\"1\"/>\n    </disk>\n    \
                 <disk type=\"volume\" device=\"disk\">\n      <driver name=\"qemu\" type=\"raw\"/>\n      \
                 <source pool=\"{pool}\" volume=\"{cidata}\"/>\n      <target dev=\"vdb\" bus=\"virtio\"/>\n      \
                 <readonly/>\n    </disk>\n"
            );
        }
    }
    let _ = write!(
        x,
        "    <interface type=\"network\">\n      <source network=\"{}\"/>\n      <model type=\"virtio\"/>\n    </interface>\n",
        e(&spec.network)
    );
    if spec.arch == Arch::S390x {
        x.push_str("    <console type=\"pty\">\n      <target type=\"sclp\" port=\"0\"/>\n    </console>\n");
    } else {
        x.push_str(
            "    <serial type=\"pty\">\n      <target port=\"0\"/>\n    </serial>\n    \
             <console type=\"pty\">\n      <target type=\"serial\" port=\"0\"/>\n    </console>\n",
        );
    }
    x.push_str(
        "    <rng model=\"virtio\">\n      <backend model=\"random\">/dev/urandom</backend>\n    </rng>\n  \
         </devices>\n</domain>\n",
    );
    x
}

/// A storage volume definition; `backing` is the backing volume's path and
/// format for an overlay.
pub fn volume_xml(
    name: &str,
    capacity_bytes: u64,
    format: &str,
    backing: Option<(&str, &str)>,
) -> String {
    let mut x = format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit=\"bytes\">{capacity_bytes}</capacity>\n  \
         <target>\n    <format type=\"{}\"/>\n  </target>\n",
        escape(name),
        escape(format)
    );
    if let Some((path, backing_format)) = backing {
        let _ = write!(
            x,
            "  <backingStore>\n    <path>{}</path>\n    <format type=\"{}\"/>\n  </backingStore>\n",
            escape(path),
            escape(backing_format)
        );
    }
    x.push_str("</volume>\n");
    x
}

/// The format (`qcow2`, `raw`, ...) in a volume's XML, if it names one.
pub fn volume_format(volume_xml: &str) -> Result<Option<String>, String> {
    let doc = roxmltree::Document::parse(volume_xml).map_err(|e| e.to_string())?;
    Ok(doc
        .root_element()
        .children()
        .find(|n| n.has_tag_name("target"))
        .and_then(|t| t.children().find(|n| n.has_tag_name("format")))
        .and_then(|f| f.attribute("type"))
        .map(str::to_owned))
}

/// What a delete needs to know about a defined domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainFacts {
    /// It has an NVRAM file (undefine must remove it too).
    pub has_nvram: bool,
    /// Its disks that are pool volumes.
    pub volumes: Vec<OwnedVolume>,
}

/// Reads a domain's XML (`virDomainGetXMLDesc`).
pub fn domain_facts(domain_xml: &str) -> Result<DomainFacts, String> {
    let doc = roxmltree::Document::parse(domain_xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    let has_nvram = root
        .children()
        .find(|n| n.has_tag_name("os"))
        .is_some_and(|os| os.children().any(|n| n.has_tag_name("nvram")));
    let volumes = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("disk") && n.attribute("type") == Some("volume"))
        .filter_map(|disk| disk.children().find(|n| n.has_tag_name("source")))
        .filter_map(|s| {
            Some(OwnedVolume {
                pool: s.attribute("pool")?.to_owned(),
                name: s.attribute("volume")?.to_owned(),
            })
        })
        .collect();
    Ok(DomainFacts { has_nvram, volumes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> InstanceMetadata {
        let mut tags = BTreeMap::new();
        tags.insert("podvisor.io/node".into(), "node-a".into());
        tags.insert("podvisor.io/token".into(), "pv-abc-g1".into());
        tags.insert("team".into(), "a&b <c>".into());
        InstanceMetadata {
            token: "pv-abc-g1".into(),
            node: "node-a".into(),
            sandbox: "3f2a1b4c".into(),
            created_at: 1_764_000_000_123,
            tags,
            volumes: vec![
                OwnedVolume {
                    pool: "default".into(),
                    name: "podvm-web-3f2a1b4c-root.qcow2".into(),
                },
                OwnedVolume {
                    pool: "default".into(),
                    name: "podvm-web-3f2a1b4c-cloudinit.iso".into(),
                },
            ],
        }
    }

    fn spec(arch: Arch, domain_type: &str) -> DomainSpec {
        DomainSpec {
            name: "podvm-web-3f2a1b4c".into(),
            uuid: "1b4e28ba-2fa1-81d2-883f-0016d3cca427".into(),
            domain_type: domain_type.into(),
            arch,
            vcpus: 2,
            memory_mib: 8192,
            cpuset: Some("0-3,^2".into()),
            firmware: Some("/usr/share/OVMF/OVMF_CODE_4M.fd".into()),
            s390_pv: arch == Arch::S390x,
            pool: "default".into(),
            root_volume: "podvm-web-3f2a1b4c-root.qcow2".into(),
            cidata_volume: "podvm-web-3f2a1b4c-cloudinit.iso".into(),
            network: "default".into(),
            metadata: metadata(),
        }
    }

    /// The element at `path` (child names from the root), or a panic naming it.
    fn at<'a, 'i>(doc: &'a roxmltree::Document<'i>, path: &[&str]) -> roxmltree::Node<'a, 'i> {
        let mut node = doc.root_element();
        for step in path {
            node = node
                .children()
                .find(|n| n.is_element() && n.tag_name().name() == *step)
                .unwrap_or_else(|| panic!("no <{step}> in {path:?}"));
        }
        node
    }

    fn disks<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> Vec<roxmltree::Node<'a, 'i>> {
        at(doc, &["devices"])
            .children()
            .filter(|n| n.has_tag_name("disk"))
            .collect()
    }

    #[test]
    fn metadata_round_trips_through_its_xml_with_escaping() {
        let m = metadata();
        let xml = m.to_xml();
        assert!(xml.contains("a&amp;b &lt;c&gt;"), "{xml}");
        assert_eq!(InstanceMetadata::parse(&xml).unwrap(), m);
        // As virDomainGetMetadata returns it: no prefix, no namespace.
        let bare = "<instance><token>t</token><node>n</node><sandbox>s</sandbox>\
                    <created-at>5</created-at><tag key='k'>v</tag></instance>";
        let m = InstanceMetadata::parse(bare).unwrap();
        assert_eq!(
            (m.token.as_str(), m.node.as_str(), m.created_at),
            ("t", "n", 5)
        );
        assert_eq!(m.tags["k"], "v");
    }

    #[test]
    fn metadata_that_is_not_podvisors_is_refused() {
        for bad in [
            "<other/>",
            "<instance/>",
            "<instance><token></token></instance>",
            "<instance><token>t</token><created-at>soon</created-at></instance>",
            "<instance><token>t</token><tag>v</tag></instance>",
            "not xml",
        ] {
            assert!(InstanceMetadata::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn x86_64_domains_are_q35_with_ovmf_and_sata_disks() {
        let xml = domain_xml(&spec(Arch::X86_64, "kvm"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("kvm"));
        assert_eq!(at(&doc, &["name"]).text(), Some("podvm-web-3f2a1b4c"));
        assert_eq!(
            at(&doc, &["uuid"]).text(),
            Some("1b4e28ba-2fa1-81d2-883f-0016d3cca427")
        );
        assert_eq!(at(&doc, &["memory"]).attribute("unit"), Some("MiB"));
        assert_eq!(at(&doc, &["memory"]).text(), Some("8192"));
        assert_eq!(at(&doc, &["vcpu"]).text(), Some("2"));
        assert_eq!(at(&doc, &["vcpu"]).attribute("cpuset"), Some("0-3,^2"));
        let ty = at(&doc, &["os", "type"]);
        assert_eq!(
            (ty.attribute("arch"), ty.attribute("machine"), ty.text()),
            (Some("x86_64"), Some("q35"), Some("hvm"))
        );
        let loader = at(&doc, &["os", "loader"]);
        assert_eq!(loader.text(), Some("/usr/share/OVMF/OVMF_CODE_4M.fd"));
        assert_eq!(loader.attribute("type"), Some("pflash"));
        assert_eq!(
            at(&doc, &["cpu"]).attribute("mode"),
            Some("host-passthrough")
        );
        let disks = disks(&doc);
        assert_eq!(disks.len(), 2);
        let target = |d: &roxmltree::Node| {
            let t = d.children().find(|n| n.has_tag_name("target")).unwrap();
            (
                t.attribute("dev").unwrap().to_owned(),
                t.attribute("bus").unwrap().to_owned(),
            )
        };
        assert_eq!(disks[0].attribute("device"), Some("disk"));
        assert_eq!(target(&disks[0]), ("sda".into(), "sata".into()));
        assert_eq!(disks[1].attribute("device"), Some("cdrom"));
        assert_eq!(target(&disks[1]), ("sdb".into(), "sata".into()));
        assert!(disks[1].children().any(|n| n.has_tag_name("readonly")));
        let nic = at(&doc, &["devices", "interface"]);
        assert_eq!(nic.attribute("type"), Some("network"));
        assert_eq!(
            at(&doc, &["devices", "interface", "source"]).attribute("network"),
            Some("default")
        );
        assert!(root.children().all(|n| !n.has_tag_name("launchSecurity")));
    }

    #[test]
    fn the_metadata_element_sits_in_the_podvisor_namespace() {
        let xml = domain_xml(&spec(Arch::X86_64, "kvm"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let element = at(&doc, &["metadata"]).first_element_child().unwrap();
        assert_eq!(element.tag_name().namespace(), Some(METADATA_NAMESPACE));
        assert_eq!(element.tag_name().name(), "instance");
        let token = element
            .children()
            .find(|n| n.has_tag_name((METADATA_NAMESPACE, "token")))
            .unwrap();
        assert_eq!(token.text(), Some("pv-abc-g1"));
        // And the domain facts read the volumes back from the disks.
        let facts = domain_facts(&xml).unwrap();
        assert!(!facts.has_nvram);
        assert_eq!(facts.volumes, metadata().volumes);
    }

    #[test]
    fn tcg_domains_ask_for_no_host_cpu() {
        let xml = domain_xml(&spec(Arch::X86_64, "qemu"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(doc.root_element().attribute("type"), Some("qemu"));
        assert!(
            doc.root_element()
                .children()
                .all(|n| !n.has_tag_name("cpu"))
        );
        let mut no_firmware = spec(Arch::X86_64, "qemu");
        no_firmware.firmware = None;
        no_firmware.cpuset = None;
        let xml = domain_xml(&no_firmware);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert!(
            at(&doc, &["os"])
                .children()
                .all(|n| !n.has_tag_name("loader"))
        );
        assert_eq!(at(&doc, &["vcpu"]).attribute("cpuset"), None);
    }

    #[test]
    fn aarch64_domains_are_virt_machines_with_virtio_and_a_scsi_cdrom() {
        let xml = domain_xml(&spec(Arch::Aarch64, "qemu"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let ty = at(&doc, &["os", "type"]);
        assert_eq!(
            (ty.attribute("arch"), ty.attribute("machine")),
            (Some("aarch64"), Some("virt"))
        );
        assert!(
            at(&doc, &["os"])
                .children()
                .any(|n| n.has_tag_name("loader"))
        );
        assert_eq!(at(&doc, &["cpu"]).attribute("mode"), Some("maximum"));
        let disks = disks(&doc);
        let bus = |d: &roxmltree::Node| {
            d.children()
                .find(|n| n.has_tag_name("target"))
                .unwrap()
                .attribute("bus")
                .unwrap()
                .to_owned()
        };
        assert_eq!(bus(&disks[0]), "virtio");
        assert_eq!(disks[1].attribute("device"), Some("cdrom"));
        assert_eq!(bus(&disks[1]), "scsi");
        let controller = at(&doc, &["devices", "controller"]);
        assert_eq!(controller.attribute("model"), Some("virtio-scsi"));
    }

    #[test]
    fn s390x_domains_are_ccw_with_protected_virtualization_and_no_firmware() {
        let xml = domain_xml(&spec(Arch::S390x, "kvm"));
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let ty = at(&doc, &["os", "type"]);
        assert_eq!(
            (ty.attribute("arch"), ty.attribute("machine")),
            (Some("s390x"), Some("s390-ccw-virtio"))
        );
        assert!(
            at(&doc, &["os"])
                .children()
                .all(|n| !n.has_tag_name("loader"))
        );
        assert_eq!(
            at(&doc, &["launchSecurity"]).attribute("type"),
            Some("s390-pv")
        );
        let disks = disks(&doc);
        assert!(disks.iter().all(|d| d.attribute("device") == Some("disk")));
        assert!(disks[1].children().any(|n| n.has_tag_name("readonly")));
        assert_eq!(
            at(&doc, &["devices", "console", "target"]).attribute("type"),
            Some("sclp")
        );
    }

    #[test]
    fn values_are_escaped_so_a_name_cannot_inject_elements() {
        let mut s = spec(Arch::X86_64, "kvm");
        s.network = "net\"/><evil/><x a=\"".into();
        let xml = domain_xml(&s);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(
            at(&doc, &["devices", "interface", "source"]).attribute("network"),
            Some(s.network.as_str())
        );
        assert!(doc.descendants().all(|n| !n.has_tag_name("evil")));
    }

    #[test]
    fn overlay_volumes_name_their_backing_store() {
        let xml = volume_xml(
            "r-root.qcow2",
            10 << 30,
            "qcow2",
            Some(("/p/base.qcow2", "qcow2")),
        );
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(at(&doc, &["capacity"]).text(), Some("10737418240"));
        assert_eq!(
            at(&doc, &["backingStore", "path"]).text(),
            Some("/p/base.qcow2")
        );
        assert_eq!(volume_format(&xml).unwrap().as_deref(), Some("qcow2"));
        let iso = volume_xml("r-cloudinit.iso", 53248, "raw", None);
        assert!(!iso.contains("backingStore"));
        assert_eq!(volume_format(&iso).unwrap().as_deref(), Some("raw"));
    }

    #[test]
    fn host_facts_prefer_kvm_then_qemu_then_the_drivers_own_type() {
        let caps = |host: &str, guests: &str| {
            format!(
                "<capabilities><host><cpu><arch>{host}</arch></cpu></host>{guests}</capabilities>"
            )
        };
        let guest = |arch: &str, types: &[&str]| {
            let d: String = types
                .iter()
                .map(|t| format!("<domain type='{t}'/>"))
                .collect();
            format!("<guest><os_type>hvm</os_type><arch name='{arch}'>{d}</arch></guest>")
        };
        let kvm = caps(
            "x86_64",
            &(guest("i686", &["qemu"]) + &guest("x86_64", &["qemu", "kvm"])),
        );
        assert_eq!(
            host_facts(&kvm).unwrap(),
            HostFacts {
                host_arch: "x86_64".into(),
                domain_type: "kvm".into()
            }
        );
        let tcg = caps("x86_64", &guest("x86_64", &["qemu"]));
        assert_eq!(host_facts(&tcg).unwrap().domain_type, "qemu");
        let test_driver = caps("i686", &guest("i686", &["test"]));
        let facts = host_facts(&test_driver).unwrap();
        assert_eq!(facts.domain_type, "test");
        assert_eq!(Arch::for_host(&facts.host_arch), Some(Arch::X86_64));
        assert!(host_facts(&caps("x86_64", "")).is_err());
        assert!(host_facts("<capabilities/>").is_err());
        assert_eq!(Arch::for_host("riscv64"), None);
    }

    #[test]
    fn domain_facts_see_nvram() {
        let xml = "<domain><os><nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram></os>\
                   <devices><disk type='file'><source file='/x'/></disk></devices></domain>";
        let f = domain_facts(xml).unwrap();
        assert!(f.has_nvram);
        assert!(f.volumes.is_empty(), "only pool volumes are owned");
    }
}
