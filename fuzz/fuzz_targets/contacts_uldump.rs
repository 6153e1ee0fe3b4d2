#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kaping::fuzzing::contacts_uldump(data));
