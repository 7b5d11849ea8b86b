// Throwing a C++ exception for gpumem's C interface.
//
// PyTorch calls the plugin's malloc through a std::function and does not check its result:
// a null pointer becomes a tensor whose data pointer is null, and the program crashes later,
// far from the cause. An exception thrown here instead travels up through PyTorch's C++ to its
// Python binding, which raises it as a RuntimeError carrying this message, at the line that
// allocated. Rust calls these through the "C-unwind" ABI, which lets the exception pass
// through the Rust frame that called them.
#include <stdexcept>
#include <string>

extern "C" [[noreturn]] void gpumem_throw_runtime_error(const char* message) {
    throw std::runtime_error(std::string(message));
}
