//! The word list on disk: `filter_words.txt` in the data directory, one word
//! per line, UTF-8, lines starting with `#` ignored. It owns the file format
//! and the atomic save. It must never leave a half-written list where the
//! server will read it: a save writes a private temporary file and renames
//! it over the old one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::words::{Entry, WordList};
use super::FilterError;

/// The list's file name inside the data directory.
pub const FILE_NAME: &str = "filter_words.txt";

/// What a saved list starts with, so that someone opening it knows the
/// format.
const HEADER: &str = "# Sensitive words, one per line. Lines starting with # are comments.\n\
# Case, width, accents and separators do not matter: `fuck` also stops `F.U.C.K`.\n";

/// Where the list lives in `data_dir`.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads a list. A missing file is an empty list, so a fresh data directory
/// needs no setup; any other problem is an error naming the file and, for
/// a bad word, its line.
pub fn load(path: &Path) -> Result<WordList, FilterError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(WordList::new()),
        Err(source) => {
            return Err(FilterError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| FilterError::NotUtf8 {
        path: path.into(),
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
    })?;
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let word = line.trim();
        if word.is_empty() || word.starts_with('#') {
            continue;
        }
        match Entry::new(word) {
            Ok(Some(entry)) => entries.push(entry),
            Ok(None) => {}
            Err(source) => {
                return Err(FilterError::Line {
                    path: path.into(),
                    line: i + 1,
                    source,
                })
            }
        }
    }
    WordList::from_entries(entries).map_err(|source| FilterError::List {
        path: path.into(),
        source,
    })
}

/// Writes `words` to `path` atomically: a temporary file beside it (mode
/// 0600, since the list is moderation data), flushed to disk, renamed over
/// `path`. A reader sees the old list or the new one, never a mix.
pub fn save(path: &Path, words: &WordList) -> Result<(), FilterError> {
    let write_err = |source| FilterError::Write {
        path: path.into(),
        source,
    };
    let mut content = String::from(HEADER);
    for word in words.words() {
        content.push_str(word);
        content.push('\n');
    }
    let tmp = temp_path(path);
    let written = write_new(&tmp, content.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    // The rename is only durable once the directory entry is.
    sync_dir(path).map_err(write_err)
}

/// A name no other save, in this process or another, is using.
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map_or_else(|| FILE_NAME.into(), |n| n.to_string_lossy());
    let tmp = format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(tmp)
}

fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(unix)]
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::WordListError;

    #[test]
    fn a_missing_file_is_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&path_in(dir.path())).unwrap().is_empty());
    }

    #[test]
    fn comments_blanks_bom_and_crlf_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        std::fs::write(
            &path,
            "\u{FEFF}# header\r\nfuck\r\n\r\n  # indented comment\n 傻逼 \n...\nFUCK\n",
        )
        .unwrap();
        let list = load(&path).unwrap();
        assert_eq!(list.words().collect::<Vec<_>>(), ["fuck", "傻逼"]);
    }

    #[test]
    fn save_then_load_gives_the_same_list_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        std::fs::write(&path, "old\n").unwrap();
        let list = WordList::from_words(["Idiot", "傻逼", "ｂａｋａ"]).unwrap();
        save(&path, &list).unwrap();
        assert_eq!(load(&path).unwrap(), list);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME], "no temporary file is left behind");
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        std::fs::write(&path, format!("# c\nok\n{}\n", "x".repeat(65))).unwrap();
        match load(&path) {
            Err(FilterError::Line {
                line: 3,
                source: WordListError::TooLong { .. },
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        std::fs::write(&path, b"ok\n\xff\n").unwrap();
        assert!(matches!(
            load(&path),
            Err(FilterError::NotUtf8 { line: 2, .. })
        ));
    }

    #[test]
    fn the_sample_list_loads() {
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/filter_words.sample.txt");
        let list = load(&sample).unwrap();
        assert!(list.len() >= 5, "sample has {} words", list.len());
        assert!(list.contains("傻逼"));
    }
}
