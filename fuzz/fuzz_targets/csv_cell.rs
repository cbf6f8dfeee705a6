//! The operations log's CSV cell writer on any text: a CSV reader gets the value
//! back exactly (with a `'` in front when it starts like a formula), the row keeps
//! its number of fields, and no cell read back starts with a character that makes
//! a spreadsheet evaluate it.
#![no_main]

use dbops::fuzzing::csv_cell;
use libfuzzer_sys::fuzz_target;

const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let cell = csv_cell(value);
    // Not first on its line: a reader drops a byte-order mark at the start of a file.
    let line = format!("start,{cell},end\n");
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(line.as_bytes());
    let records: Vec<csv::StringRecord> = reader
        .records()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{cell:?} is not valid CSV: {e}"));
    assert_eq!(records.len(), 1, "{cell:?} spans {} records", records.len());
    let fields: Vec<&str> = records[0].iter().collect();
    assert_eq!(fields.len(), 3, "{cell:?} read back as {fields:?}");
    let expected = if value.starts_with(FORMULA_STARTS) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    assert_eq!(fields[1], expected);
    assert!(!fields[1].starts_with(FORMULA_STARTS));
});
