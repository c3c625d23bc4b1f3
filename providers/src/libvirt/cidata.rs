//! The NoCloud `cidata` volume: an ISO 9660 image holding `user-data`,
//! `meta-data` and an empty `vendor-data`, built in memory.
//!
//! Written here rather than by a crate or a tool: the image is three small
//! files in one directory, the crates that write ISO 9660 are young and
//! between major versions, and an external `genisoimage` would be one more
//! program every node must have. The image is plain ISO 9660 (level 2 names,
//! for readers without extensions) plus a Joliet tree that carries the real
//! lower-case names (`user-data`), as `genisoimage -J -V cidata` makes them;
//! Linux reads the Joliet names. `isoinfo` checks the result in the tests.

/// ISO 9660 logical sector size.
const SECTOR: usize = 2048;

/// The volume label cloud-init's NoCloud datasource looks for.
pub const VOLUME_ID: &str = "cidata";

/// The file names in the volume, and what the pod VM reads.
const USER_DATA: &str = "user-data";
const META_DATA: &str = "meta-data";
const VENDOR_DATA: &str = "vendor-data";

/// The `meta-data` document: the instance id and the hostname.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!("instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
}

/// The cidata image with `user_data` and `meta_data` (and an empty
/// `vendor-data`); `unix_seconds` dates the volume and its files.
pub fn cidata_image(user_data: &[u8], meta_data: &[u8], unix_seconds: u64) -> Vec<u8> {
    let files: [(&str, &[u8]); 3] = [
        (META_DATA, meta_data),
        (USER_DATA, user_data),
        (VENDOR_DATA, b""),
    ];
    build(VOLUME_ID, &files, unix_seconds)
}

/// Sector layout: 16 system sectors, the primary and Joliet descriptors,
/// the terminator, four path tables, two root directories, then the files.
const PVD_SECTOR: usize = 16;
const SVD_SECTOR: usize = 17;
const TERMINATOR_SECTOR: usize = 18;
const PATH_TABLES: [usize; 4] = [19, 20, 21, 22]; // primary L, M; Joliet L, M
const PRIMARY_ROOT: usize = 23;
const JOLIET_ROOT: usize = 24;
const FIRST_FILE_SECTOR: usize = 25;

/// A root-only path table is one 10-byte record.
const PATH_TABLE_SIZE: u32 = 10;

/// One ISO 9660 image of `files` in its root directory. `files` must be
/// sorted by name and few enough that each root directory fits one sector
/// (the three cidata files use a fraction of it).
fn build(volume_id: &str, files: &[(&str, &[u8])], unix_seconds: u64) -> Vec<u8> {
    let date = RecordingDate::from_unix(unix_seconds);

    // Where each file's data goes.
    let mut extents = Vec::with_capacity(files.len());
    let mut next = FIRST_FILE_SECTOR;
    for (_, data) in files {
        extents.push(next);
        next += data.len().div_ceil(SECTOR);
    }
    let total_sectors = next;
    let mut image = vec![0u8; total_sectors * SECTOR];

    for (joliet, sector, root) in [
        (false, PVD_SECTOR, PRIMARY_ROOT),
        (true, SVD_SECTOR, JOLIET_ROOT),
    ] {
        let (l_table, m_table) = if joliet {
            (PATH_TABLES[2], PATH_TABLES[3])
        } else {
            (PATH_TABLES[0], PATH_TABLES[1])
        };
        let descriptor = volume_descriptor(
            joliet,
            volume_id,
            total_sectors as u32,
            l_table as u32,
            m_table as u32,
            root as u32,
            &date,
        );
        image[sector * SECTOR..(sector + 1) * SECTOR].copy_from_slice(&descriptor);
        write_path_table(&mut image, l_table, root as u32, false);
        write_path_table(&mut image, m_table, root as u32, true);

        let mut dir = Vec::with_capacity(SECTOR);
        dir.extend(directory_record(
            &[0],
            root as u32,
            SECTOR as u32,
            true,
            &date,
        ));
        dir.extend(directory_record(
            &[1],
            root as u32,
            SECTOR as u32,
            true,
            &date,
        ));
        let mut entries: Vec<(Vec<u8>, u32, u32)> = files
            .iter()
            .zip(&extents)
            .map(|((name, data), extent)| {
                let id = if joliet {
                    // No `;1` version here, as genisoimage writes Joliet.
                    ucs2(name)
                } else {
                    primary_name(name).into_bytes()
                };
                (id, *extent as u32, data.len() as u32)
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, extent, len) in entries {
            dir.extend(directory_record(&id, extent, len, false, &date));
        }
        assert!(
            dir.len() <= SECTOR,
            "the cidata root directory fits a sector"
        );
        image[root * SECTOR..root * SECTOR + dir.len()].copy_from_slice(&dir);
    }

    let terminator = &mut image[TERMINATOR_SECTOR * SECTOR..];
    terminator[0] = 255;
    terminator[1..6].copy_from_slice(b"CD001");
    terminator[6] = 1;

    for ((_, data), extent) in files.iter().zip(&extents) {
        image[extent * SECTOR..extent * SECTOR + data.len()].copy_from_slice(data);
    }
    image
}

/// The plain ISO 9660 name: upper case, `-` as `_` (level 2 d-characters),
/// a dot and version 1 (`user-data` → `USER_DATA.;1`).
fn primary_name(name: &str) -> String {
    let stem: String = name
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    format!("{stem}.;1")
}

/// UCS-2 big-endian, as Joliet stores names.
fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// A 16-bit value in both byte orders.
fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

/// A 32-bit value in both byte orders.
fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// Fills `field` with `text` and pads it with spaces (UCS-2 spaces for Joliet).
fn fill(field: &mut [u8], text: &str, joliet: bool) {
    let bytes = if joliet {
        ucs2(text)
    } else {
        text.as_bytes().to_vec()
    };
    let pad: &[u8] = if joliet { &[0, b' '] } else { b" " };
    for (i, slot) in field.iter_mut().enumerate() {
        *slot = match bytes.get(i) {
            Some(b) => *b,
            None => pad[(i - bytes.len()) % pad.len()],
        };
    }
}

/// The primary (`joliet == false`) or Joliet supplementary volume descriptor.
fn volume_descriptor(
    joliet: bool,
    volume_id: &str,
    total_sectors: u32,
    l_table: u32,
    m_table: u32,
    root: u32,
    date: &RecordingDate,
) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = if joliet { 2 } else { 1 };
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    fill(&mut d[8..40], "LINUX", joliet);
    fill(&mut d[40..72], volume_id, joliet);
    d[80..88].copy_from_slice(&both32(total_sectors));
    if joliet {
        // UCS-2 level 3.
        d[88..91].copy_from_slice(b"%/E");
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(PATH_TABLE_SIZE));
    d[140..144].copy_from_slice(&l_table.to_le_bytes());
    d[148..152].copy_from_slice(&m_table.to_be_bytes());
    let root_record = directory_record(&[0], root, SECTOR as u32, true, date);
    d[156..190].copy_from_slice(&root_record);
    for range in [190..318, 318..446, 446..574, 574..702] {
        fill(&mut d[range], "", joliet);
    }
    fill(&mut d[574..702], "PODVISOR", joliet);
    for range in [702..739, 739..776, 776..813] {
        fill(&mut d[range], "", joliet);
    }
    let stamp = date.descriptor_form();
    d[813..830].copy_from_slice(&stamp);
    d[830..847].copy_from_slice(&stamp);
    // Expiration and effective dates: "not specified".
    for range in [847..864, 864..881] {
        d[range.start..range.end - 1].fill(b'0');
    }
    d[881] = 1;
    d
}

/// A directory record: `.` is identifier `[0]`, `..` is `[1]`.
fn directory_record(
    identifier: &[u8],
    extent: u32,
    length: u32,
    is_dir: bool,
    date: &RecordingDate,
) -> Vec<u8> {
    let padded = identifier.len() + (identifier.len() + 1) % 2;
    let mut r = vec![0u8; 33 + padded];
    r[0] = r.len() as u8;
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(length));
    r[18..25].copy_from_slice(&date.record_form());
    r[25] = if is_dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = identifier.len() as u8;
    r[33..33 + identifier.len()].copy_from_slice(identifier);
    r
}

/// The one-record path table of a root-only tree.
fn write_path_table(image: &mut [u8], sector: usize, root: u32, big_endian: bool) {
    let t = &mut image[sector * SECTOR..sector * SECTOR + PATH_TABLE_SIZE as usize];
    t[0] = 1;
    let (extent, parent) = if big_endian {
        (root.to_be_bytes(), 1u16.to_be_bytes())
    } else {
        (root.to_le_bytes(), 1u16.to_le_bytes())
    };
    t[2..6].copy_from_slice(&extent);
    t[6..8].copy_from_slice(&parent);
}

/// A UTC calendar time, for the descriptors and directory records.
struct RecordingDate {
    year: u64,
    month: u64,
    day: u64,
    hour: u64,
    minute: u64,
    second: u64,
}

impl RecordingDate {
    fn from_unix(seconds: u64) -> Self {
        let days = seconds / 86_400;
        let rest = seconds % 86_400;
        // Howard Hinnant's days-to-civil, for days since 1970-01-01.
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + u64::from(month <= 2);
        Self {
            year: year.min(9999),
            month,
            day,
            hour: rest / 3600,
            minute: rest % 3600 / 60,
            second: rest % 60,
        }
    }

    /// The 7-byte binary form of directory records (years since 1900, UTC).
    fn record_form(&self) -> [u8; 7] {
        [
            (self.year.saturating_sub(1900)).min(255) as u8,
            self.month as u8,
            self.day as u8,
            self.hour as u8,
            self.minute as u8,
            self.second as u8,
            0,
        ]
    }

    /// The 17-byte digit form of volume descriptors (UTC).
    fn descriptor_form(&self) -> [u8; 17] {
        let digits = format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}00",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        let mut out = [0u8; 17];
        out[..16].copy_from_slice(digits.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const USER: &[u8] =
        b"#cloud-config\nwrite_files:\n- path: /run/peerpod/apf.json\n  content: '{}'\n";

    fn image() -> Vec<u8> {
        let meta = meta_data("1b4e28ba-2fa1-11d2-883f-0016d3cca427", "podvm-web-3f2a1b4c");
        cidata_image(USER, meta.as_bytes(), 1_764_000_000)
    }

    /// Runs `isoinfo` (apt `genisoimage`) on `image`; the independent reader.
    fn isoinfo(image: &[u8], args: &[&str]) -> String {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), image).unwrap();
        let out = Command::new("isoinfo")
            .args(args)
            .arg("-i")
            .arg(file.path())
            .output()
            .expect("isoinfo is needed by this test: apt-get install genisoimage");
        assert!(
            out.status.success(),
            "isoinfo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_image_is_whole_sectors_with_the_descriptors_in_place() {
        let iso = image();
        assert_eq!(iso.len() % SECTOR, 0);
        // meta-data and user-data take one sector each; vendor-data none.
        assert_eq!(iso.len(), (FIRST_FILE_SECTOR + 2) * SECTOR);
        assert_eq!(
            &iso[PVD_SECTOR * SECTOR..PVD_SECTOR * SECTOR + 6],
            b"\x01CD001"
        );
        assert_eq!(
            &iso[SVD_SECTOR * SECTOR..SVD_SECTOR * SECTOR + 6],
            b"\x02CD001"
        );
        assert_eq!(
            &iso[TERMINATOR_SECTOR * SECTOR..TERMINATOR_SECTOR * SECTOR + 6],
            b"\xffCD001"
        );
        assert_eq!(
            &iso[PVD_SECTOR * SECTOR + 40..PVD_SECTOR * SECTOR + 46],
            b"cidata"
        );
    }

    #[test]
    fn isoinfo_reads_the_label_and_finds_joliet() {
        let info = isoinfo(&image(), &["-d"]);
        assert!(info.contains("Volume id: cidata"), "{info}");
        assert!(info.contains("Joliet with UCS level 3 found"), "{info}");
        assert!(
            info.contains(&format!("Volume size is: {}", FIRST_FILE_SECTOR + 2)),
            "{info}"
        );
    }

    #[test]
    fn isoinfo_lists_the_nocloud_names_in_the_joliet_tree() {
        let listing = isoinfo(&image(), &["-J", "-f"]);
        let mut names: Vec<&str> = listing.lines().collect();
        names.sort();
        assert_eq!(names, ["/meta-data", "/user-data", "/vendor-data"]);
        let plain = isoinfo(&image(), &["-f"]);
        assert!(plain.contains("/USER_DATA.;1"), "{plain}");
    }

    #[test]
    fn isoinfo_extracts_each_file_byte_for_byte() {
        let iso = image();
        assert_eq!(isoinfo(&iso, &["-J", "-x", "/user-data"]).as_bytes(), USER);
        assert_eq!(
            isoinfo(&iso, &["-J", "-x", "/meta-data"]),
            "instance-id: 1b4e28ba-2fa1-11d2-883f-0016d3cca427\nlocal-hostname: podvm-web-3f2a1b4c\n"
        );
        assert_eq!(isoinfo(&iso, &["-J", "-x", "/vendor-data"]), "");
    }

    #[test]
    fn a_user_data_larger_than_a_sector_spans_sectors_and_reads_back_whole() {
        let big: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let iso = cidata_image(&big, b"local-hostname: x\n", 0);
        assert_eq!(iso.len(), (FIRST_FILE_SECTOR + 1 + 3) * SECTOR);
        let read = isoinfo(&iso, &["-J", "-x", "/user-data"]);
        assert!(
            read.as_bytes() == big.as_slice(),
            "read {} bytes of {}",
            read.len(),
            big.len()
        );
    }

    #[test]
    fn dates_are_civil_utc() {
        // 2025-11-24T16:00:00Z
        let d = RecordingDate::from_unix(1_764_000_000);
        assert_eq!(
            (d.year, d.month, d.day, d.hour, d.minute, d.second),
            (2025, 11, 24, 16, 0, 0)
        );
        assert_eq!(&d.descriptor_form()[..16], b"2025112416000000");
        let epoch = RecordingDate::from_unix(0);
        assert_eq!(epoch.record_form(), [70, 1, 1, 0, 0, 0, 0]);
        let leap = RecordingDate::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }
}
