// The CPU-emulation build of every kernel file (worker/build.rs compiles this with the host C++
// compiler; the tests call the `emu_*` entry points through FFI).
#include "cpu_emulation.h"

#include "emulator_selftest.cu"
#include "norm.cu"
#include "attention.cu"
#include "optim.cu"
#include "lowrank.cu"
#include "cayley.cu"

extern "C" void loft_emu_set_reverse_order(bool reverse) { loft_emu::reverse_order = reverse; }
extern "C" uint16_t loft_emu_f32_to_f16(float f) { return loft_emu::f32_to_f16_bits(f); }
extern "C" float loft_emu_f16_to_f32(uint16_t h) { return loft_emu::f16_bits_to_f32(h); }
extern "C" uint16_t loft_emu_f32_to_bf16(float f) { return loft_emu::f32_to_bf16_bits(f); }
