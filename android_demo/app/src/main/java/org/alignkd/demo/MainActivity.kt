package org.alignkd.demo

import android.content.Intent
import android.graphics.Bitmap
import android.net.Uri
import android.os.Bundle
import android.os.Debug
import android.view.Menu
import android.view.MenuItem
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.core.content.FileProvider
import org.alignkd.core.AnswerListener
import org.alignkd.core.BundleException
import org.alignkd.core.LoadedBundle
import org.alignkd.core.MemoryStats
import org.alignkd.core.RgbImage
import org.alignkd.core.SamplingConfig
import org.alignkd.core.VlmSession
import java.io.File
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean

/**
 * The one screen: load a bundle (manifest verified: format version, every file's size and sha256), pick an
 * image from the gallery or the camera, type a question, and watch the answer stream token by token, with
 * load time, time to first token, decode tokens/s and memory. All logic is in the `core` module; this class
 * only wires views to it and keeps model work off the UI thread.
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()
    private val stop = AtomicBoolean(false)
    private lateinit var settings: AppSettings

    private var session: VlmSession? = null
    private var runtime: ExecuTorchRuntime? = null
    private var image: RgbImage? = null
    private var loadInfo = ""
    private var busy = false

    private lateinit var bundlePath: TextView
    private lateinit var bundleStatus: TextView
    private lateinit var imageView: ImageView
    private lateinit var imageInfo: TextView
    private lateinit var question: EditText
    private lateinit var askButton: Button
    private lateinit var answer: TextView
    private lateinit var stats: TextView
    private var cameraUri: Uri? = null

    private val pickImage = registerForActivityResult(ActivityResultContracts.GetContent()) { uri ->
        if (uri != null) setImage { AndroidImages.load(this, uri) }
    }

    private val takePicture = registerForActivityResult(ActivityResultContracts.TakePicture()) { ok ->
        val uri = cameraUri
        if (ok && uri != null) setImage { AndroidImages.load(this, uri) }
    }

    private val pickBundle = registerForActivityResult(ActivityResultContracts.OpenDocumentTree()) { tree ->
        if (tree != null) importBundle(tree)
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        settings = AppSettings(this)
        bundlePath = findViewById(R.id.bundlePath)
        bundleStatus = findViewById(R.id.bundleStatus)
        imageView = findViewById(R.id.imageView)
        imageInfo = findViewById(R.id.imageInfo)
        question = findViewById(R.id.question)
        askButton = findViewById(R.id.askButton)
        answer = findViewById(R.id.answer)
        stats = findViewById(R.id.stats)

        findViewById<Button>(R.id.loadButton).setOnClickListener { loadBundle() }
        findViewById<Button>(R.id.importButton).setOnClickListener { pickBundle.launch(null) }
        findViewById<Button>(R.id.galleryButton).setOnClickListener { pickImage.launch("image/*") }
        findViewById<Button>(R.id.cameraButton).setOnClickListener { launchCamera() }
        findViewById<Button>(R.id.clearImageButton).setOnClickListener {
            image = null
            imageView.setImageDrawable(null)
            imageInfo.text = getString(R.string.no_image)
        }
        askButton.setOnClickListener { if (busy) stop.set(true) else ask() }
        if (question.text.isEmpty()) question.setText("What shape is in the image?")
    }

    override fun onResume() {
        super.onResume()
        bundlePath.text = settings.bundlePath.ifEmpty { "(no bundle path: Settings or Import)" }
    }

    override fun onCreateOptionsMenu(menu: Menu): Boolean {
        menu.add(0, 1, 0, R.string.settings)
        return true
    }

    override fun onOptionsItemSelected(item: MenuItem): Boolean {
        if (item.itemId == 1) {
            startActivity(Intent(this, SettingsActivity::class.java))
            return true
        }
        return super.onOptionsItemSelected(item)
    }

    override fun onDestroy() {
        stop.set(true)
        worker.execute { runtime?.close() }
        worker.shutdown()
        super.onDestroy()
    }

    private fun loadBundle() {
        if (busy) return
        setBusy(true, ask = false)
        bundleStatus.text = "verifying the manifest and every file's sha256…"
        val path = settings.bundlePath
        worker.execute {
            try {
                val root = AppSettings.resolveBundle(this, path)
                val t0 = System.nanoTime()
                val bundle = LoadedBundle.open(root)
                val verifyS = (System.nanoTime() - t0) * 1e-9
                val pte = bundle.manifest.pteFile()
                runOnUiThread { bundleStatus.text = "manifest OK (${"%.1f".format(verifyS)} s); loading ${pte.name}…" }
                runtime?.close()
                runtime = null
                session = null
                val t1 = System.nanoTime()
                val rt = ExecuTorchRuntime(pte, settings.threads)
                val loadS = (System.nanoTime() - t1) * 1e-9
                val artifact = bundle.manifest.pteArtifact()
                runtime = rt
                session = VlmSession(bundle, rt, settings.imageCacheSize)
                val m = bundle.model
                loadInfo = "load %.2f s (verify %.2f s)".format(loadS, verifyS)
                val text = "${bundle.name}: format_version ${bundle.manifest.raw["format_version"]}, " +
                    "${artifact.format}/${artifact.quant}, ${bundle.manifest.files.size} files verified (sha256)\n" +
                    "image ${bundle.preprocessing.imageSize} px → ${m.numImageTokens} tokens, hidden ${m.hiddenSize}, " +
                    "vocab ${m.vocabSize}, max_seq_len ${minOf(m.maxSeqLen, rt.maxSeqLen)}\n$loadInfo"
                runOnUiThread { bundleStatus.text = text; stats.text = memoryLine() }
            } catch (e: BundleException) {
                runOnUiThread { bundleStatus.text = "REFUSED (${e.refusal.id}): ${e.message}" }
            } catch (e: Throwable) {
                runOnUiThread { bundleStatus.text = "cannot load: ${e.javaClass.simpleName}: ${e.message}" }
            } finally {
                runOnUiThread { setBusy(false) }
            }
        }
    }

    private fun importBundle(tree: Uri) {
        if (busy) return
        setBusy(true, ask = false)
        worker.execute {
            try {
                val dest = AppSettings.importTree(this, tree) { msg -> runOnUiThread { bundleStatus.text = msg } }
                settings.bundlePath = dest.absolutePath
                runOnUiThread { bundlePath.text = dest.absolutePath; bundleStatus.text = "imported; press Load" }
            } catch (e: Throwable) {
                runOnUiThread { bundleStatus.text = "import failed: ${e.message}" }
            } finally {
                runOnUiThread { setBusy(false) }
            }
        }
    }

    private fun launchCamera() {
        val dir = File(cacheDir, "camera").apply { mkdirs() }
        val file = File(dir, "shot.jpg")
        val uri = FileProvider.getUriForFile(this, "$packageName.files", file)
        cameraUri = uri
        takePicture.launch(uri)
    }

    private fun setImage(load: () -> Pair<RgbImage, Bitmap>) {
        worker.execute {
            try {
                val (rgb, bmp) = load()
                image = rgb
                runOnUiThread {
                    imageView.setImageBitmap(bmp)
                    imageInfo.text = "${rgb.width}×${rgb.height}"
                }
            } catch (e: Throwable) {
                runOnUiThread { imageInfo.text = "cannot read the image: ${e.message}" }
            }
        }
    }

    private fun ask() {
        val s = session ?: run { bundleStatus.text = getString(R.string.no_bundle); return }
        val q = question.text.toString()
        val img = image
        val maxNew = settings.maxNewTokens
        val sampling = SamplingConfig(settings.temperature.toDouble(), 1.0, System.nanoTime())
        stop.set(false)
        setBusy(true, ask = true)
        answer.text = ""
        worker.execute {
            try {
                val a = s.ask(img, q, maxNew, sampling, object : AnswerListener {
                    override fun onText(text: String, tokens: Int): Boolean {
                        runOnUiThread { answer.text = text }
                        return !stop.get()
                    }
                })
                val t = a.generation.timings
                // image encode beside TTFT and decode speed: on a phone the encoder is most of the wait
                val image = if (img == null) "text only"
                    else if (t.prefixReused) "image tokens and prompt cached (follow-up)"
                    else if (t.imageCached) "image %.0f ms (tokens cached)".format(t.imageS * 1e3)
                    else "image encode %.0f ms (preprocess %.0f ms)".format(t.imageS * 1e3, a.preprocessS * 1e3)
                val line = "%s\n%s · TTFT %.0f ms · prefill %.1f tok/s (%d positions)\n" +
                    "decode %.1f tok/s (%d tokens%s) · %s"
                val text = line.format(loadInfo, image, t.ttftS * 1e3, t.prefillTokS,
                    t.prefillPositions, t.decodeTokS, a.generation.tokens.size, if (a.generation.stoppedByEos) ", EOS" else "",
                    memoryLine())
                runOnUiThread { answer.text = a.text; stats.text = text }
            } catch (e: Throwable) {
                runOnUiThread { answer.text = "error: ${e.javaClass.simpleName}: ${e.message}" }
            } finally {
                runOnUiThread { setBusy(false) }
            }
        }
    }

    private fun memoryLine(): String =
        "RSS %.0f MB (peak %.0f MB), native heap %.0f MB".format(MemoryStats.rssMb(), MemoryStats.peakRssMb(),
            Debug.getNativeHeapAllocatedSize() / 1048576.0)

    private fun setBusy(b: Boolean, ask: Boolean = false) {
        busy = b
        askButton.isEnabled = !b && session != null || (b && ask)
        askButton.text = getString(if (b && ask) R.string.stop else R.string.ask)
    }
}
