/* A stand-in for libcublas.so.12 / libcudnn.so.9 in tests/unit/test_gpu_stack.py and
 * test_devices.py: it exports the two version queries morag.gpu_stack calls, with the C
 * signatures of NVIDIA's headers (cublas_api.h: cublasStatus_t cublasGetProperty(
 * libraryPropertyType type, int *value); cudnn_graph.h: size_t cudnnGetVersion(void)).
 * The real libraries (hundreds of MB) are not downloaded for tests; the version comes from
 * -D flags at compile time. Constructed for these tests, not copied from NVIDIA. */
#include <stddef.h>

#ifdef CUBLAS_VERSION_PARTS
static const int parts[3] = {CUBLAS_VERSION_PARTS};

int cublasGetProperty(int type, int *value) {
    if (type < 0 || type > 2) return 7; /* CUBLAS_STATUS_INVALID_VALUE */
    *value = parts[type];
    return 0; /* CUBLAS_STATUS_SUCCESS */
}
#endif

#ifdef CUDNN_VERSION_NUMBER
size_t cudnnGetVersion(void) { return CUDNN_VERSION_NUMBER; }
#endif
