package org.alignkd.demo

import android.app.Activity
import android.os.Bundle
import android.util.Log
import org.alignkd.core.Benchmark
import org.alignkd.core.Json
import org.alignkd.core.LoadedBundle
import java.io.File

/**
 * Headless benchmark, started by `alignkd-mobile bench --device adb` (alignkd/bench.py `bench_adb`) or by hand:
 *
 *   adb shell am start -W -n org.alignkd.demo/.BenchmarkActivity \
 *       --es bundle /data/local/tmp/alignkd/<bundle> --ei n_runs 3 [--es out bench.json] \
 *       [--es image /data/local/tmp/alignkd/img.png] [--es prompt "What shape is in the image?"] \
 *       [--ei max_new_tokens 32] [--ei threads 0] [--es quant 8da4w]
 *
 * Loads the bundle (manifest verified), runs the fixed image + prompt once to warm up and then n_runs
 * times (greedy; each run with an empty image-token cache, then once more about the same image with its
 * tokens cached), and writes files/<out> (default bench.json) with the fields and definitions of
 * `alignkd-mobile bench --device host` (BenchmarkResult.FIELDS): bundle, format, quant, n_runs, load_s,
 * image_encode_s, ttft_s, ttft_warm_s, prefill_tok_s, decode_tok_s, peak_rss_mb. On failure the same file
 * holds {"error": "..."}. Then it
 * finishes. Read it with `adb exec-out run-as org.alignkd.demo cat files/bench.json` (debug build).
 * The default image and prompt are the export parity gate's: easy-vqa test image 0 (assets/bench.png)
 * and "What shape is in the image?".
 */
class BenchmarkActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val extras = intent.extras ?: Bundle()
        val outName = extras.getString("out") ?: "bench.json"
        val out = File(filesDir, File(outName).name) // a bare file name inside files/
        out.delete()
        Thread {
            try {
                val root = AppSettings.resolveBundle(this, extras.getString("bundle") ?: AppSettings(this).bundlePath)
                val nRuns = extras.getInt("n_runs", 3)
                val maxNew = extras.getInt("max_new_tokens", 32)
                val threads = extras.getInt("threads", 0)
                val prompt = extras.getString("prompt") ?: "What shape is in the image?"
                val imagePath = extras.getString("image")
                val (image, _) = if (imagePath != null) AndroidImages.load(File(imagePath)) else AndroidImages.loadAsset(this, "bench.png")
                val bundle = LoadedBundle.open(root)
                val quant = extras.getString("quant")
                val artifact = bundle.manifest.pteArtifact(quant)
                var rt: ExecuTorchRuntime? = null
                val result = Benchmark.run(bundle, { ExecuTorchRuntime(bundle.manifest.pteFile(quant), threads).also { rt = it } },
                    image, prompt, nRuns, maxNew, artifact.quant)
                rt?.close()
                result.writeTo(out)
                Log.i(TAG, "wrote $out: ${result.toJson()}")
            } catch (e: Throwable) {
                Log.e(TAG, "benchmark failed", e)
                val tmp = File(filesDir, ".${out.name}.tmp")
                tmp.writeText(Json.write(mapOf("error" to "${e.javaClass.simpleName}: ${e.message}")) + "\n")
                tmp.renameTo(out)
            } finally {
                runOnUiThread { finish() }
            }
        }.start()
    }

    companion object {
        const val TAG = "AlignKDBench"
    }
}
