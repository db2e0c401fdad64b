//! The one font loader of every PNG the CLI draws (bench chart, `hist`
//! plot, replay plot). plotters' `ab_glyph` backend has no system font
//! lookup, so a TTF is found here and registered once per process under
//! [`FAMILY`]. Without any font, plots are drawn without text.

use plotters::style::FontStyle;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The family name plots ask for.
pub const FAMILY: &str = "sans-serif";

/// Fonts tried first (Debian's fonts-dejavu-core, fonts-liberation), then
/// any .ttf within three levels of /usr/share/fonts.
const PREFERRED: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn find() -> Option<PathBuf> {
    if let Some(path) = PREFERRED.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(path);
    }
    // A bounded walk: three levels, at most 10,000 entries.
    let mut pending = vec![(PathBuf::from("/usr/share/fonts"), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            seen += 1;
            if seen > 10_000 {
                return None;
            }
            let path = entry.path();
            if path.is_dir() && depth < 3 {
                pending.push((path, depth + 1));
            } else if path.extension().is_some_and(|e| e == "ttf") {
                return Some(path);
            }
        }
    }
    None
}

/// Register a font once per process; false if none could be loaded.
pub fn loaded() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let Some(bytes) = find().and_then(|p| std::fs::read(p).ok()) else {
            return false;
        };
        // Leaked once per process: plotters keeps fonts for 'static.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
    })
}
